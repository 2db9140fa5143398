//! Makes the `:authority` of Workload API requests acceptable to the HTTP/2
//! server.
//!
//! gRPC C-core clients since 1.57 (Python `grpcio`, which the Python `spiffe`
//! package uses, and Ruby, PHP, C++...) send the percent-encoded socket path
//! as `:authority` on `unix:` channels, e.g. `tmp%2Fagent.sock`; grpc-java
//! sends the bare path. Neither is a valid authority (RFC 3986), and the
//! `h2` crate under tonic resets such streams with PROTOCOL_ERROR before any
//! handler runs, so those clients could not talk to the sidecar at all. Go
//! clients send `localhost`, and the Workload API ignores the authority.
//!
//! So the client-to-server half of each connection passes through this
//! adapter: it decodes every header block with the client's HPACK context,
//! replaces an invalid `:authority` by `localhost`, and re-encodes the block
//! with literals only (never touching the server's dynamic table, so the two
//! HPACK contexts cannot drift). Every other frame passes unchanged; the
//! server-to-client half is not touched.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use loona_hpack::Decoder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Frames written to the server stay within the protocol's default
/// SETTINGS_MAX_FRAME_SIZE, which every server accepts.
const MAX_OUT_PAYLOAD: usize = 16_384;
/// Larger client frames are refused (the server would refuse them too).
const MAX_IN_PAYLOAD: usize = 1 << 20;
/// A header block larger than this closes the connection.
const MAX_HEADER_BLOCK: usize = 256 * 1024;

fn protocol_error(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

struct PendingHeaders {
    stream_id: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
}

/// A server-side connection whose request headers are rewritten as the
/// module documentation says.
pub struct FixAuthority<S> {
    inner: S,
    raw: BytesMut,
    ready: BytesMut,
    preface_left: usize,
    decoder: Decoder<'static>,
    pending: Option<PendingHeaders>,
    eof: bool,
}

impl<S> FixAuthority<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            raw: BytesMut::new(),
            ready: BytesMut::new(),
            preface_left: PREFACE_LEN,
            decoder: Decoder::new(),
            pending: None,
            eof: false,
        }
    }

    /// Moves every complete unit of `raw` (preface, frames) to `ready`.
    fn process(&mut self) -> io::Result<()> {
        if self.preface_left > 0 {
            let n = self.preface_left.min(self.raw.len());
            self.ready.extend_from_slice(&self.raw.split_to(n));
            self.preface_left -= n;
            if self.preface_left > 0 {
                return Ok(());
            }
        }
        while self.raw.len() >= FRAME_HEADER_LEN {
            let len = u32::from_be_bytes([0, self.raw[0], self.raw[1], self.raw[2]]) as usize;
            if len > MAX_IN_PAYLOAD {
                return Err(protocol_error(format!("HTTP/2 frame of {len} bytes")));
            }
            if self.raw.len() < FRAME_HEADER_LEN + len {
                return Ok(());
            }
            let frame = self.raw.split_to(FRAME_HEADER_LEN + len);
            let (kind, flags) = (frame[3], frame[4]);
            let stream_id = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
            let payload = &frame[FRAME_HEADER_LEN..];
            match kind {
                HEADERS => {
                    if self.pending.is_some() {
                        return Err(protocol_error("HEADERS inside an unfinished header block"));
                    }
                    let mut p = payload;
                    let pad = if flags & PADDED != 0 {
                        let (&n, rest) = p.split_first().ok_or_else(|| protocol_error("empty padded HEADERS"))?;
                        p = rest;
                        n as usize
                    } else {
                        0
                    };
                    let priority = if flags & PRIORITY != 0 {
                        let fields: [u8; 5] = p
                            .get(..5)
                            .and_then(|s| s.try_into().ok())
                            .ok_or_else(|| protocol_error("short HEADERS"))?;
                        p = &p[5..];
                        Some(fields)
                    } else {
                        None
                    };
                    let fragment = p.get(..p.len().wrapping_sub(pad)).filter(|_| pad <= p.len());
                    let fragment = fragment.ok_or_else(|| protocol_error("HEADERS padding exceeds the payload"))?;
                    self.pending = Some(PendingHeaders { stream_id, flags, priority, block: fragment.to_vec() });
                    if flags & END_HEADERS != 0 {
                        self.flush_headers()?;
                    }
                }
                CONTINUATION => {
                    let p = self
                        .pending
                        .as_mut()
                        .filter(|p| p.stream_id == stream_id)
                        .ok_or_else(|| protocol_error("CONTINUATION without its HEADERS"))?;
                    p.block.extend_from_slice(payload);
                    if p.block.len() > MAX_HEADER_BLOCK {
                        return Err(protocol_error("header block too large"));
                    }
                    if flags & END_HEADERS != 0 {
                        self.flush_headers()?;
                    }
                }
                _ => {
                    if self.pending.is_some() {
                        return Err(protocol_error("frame inside an unfinished header block"));
                    }
                    self.ready.extend_from_slice(&frame);
                }
            }
        }
        Ok(())
    }

    fn flush_headers(&mut self) -> io::Result<()> {
        let p = self.pending.take().expect("a pending header block");
        let mut block = Vec::with_capacity(p.block.len() * 2);
        let mut result = Ok(());
        self.decoder
            .decode_with_cb(&p.block, |name, value| {
                let value: &[u8] = if &*name == b":authority" && http::uri::Authority::try_from(&*value).is_err() {
                    b"localhost"
                } else {
                    &value
                };
                if name.is_empty() {
                    result = Err(protocol_error("empty header name"));
                }
                // Literal header field without indexing, new name (RFC 7541 §6.2.2).
                block.push(0x00);
                encode_string(&name, &mut block);
                encode_string(value, &mut block);
            })
            .map_err(|e| protocol_error(format!("HPACK: {e:?}")))?;
        result?;

        let mut first = Vec::with_capacity(MAX_OUT_PAYLOAD.min(block.len() + 5));
        if let Some(pri) = p.priority {
            first.extend_from_slice(&pri);
        }
        let take = (MAX_OUT_PAYLOAD - first.len()).min(block.len());
        first.extend_from_slice(&block[..take]);
        let mut rest = &block[take..];
        let end = if rest.is_empty() { END_HEADERS } else { 0 };
        self.write_frame(HEADERS, (p.flags & (END_STREAM | PRIORITY)) | end, p.stream_id, &first);
        while !rest.is_empty() {
            let (chunk, r) = rest.split_at(MAX_OUT_PAYLOAD.min(rest.len()));
            rest = r;
            self.write_frame(CONTINUATION, if rest.is_empty() { END_HEADERS } else { 0 }, p.stream_id, chunk);
        }
        Ok(())
    }

    fn write_frame(&mut self, kind: u8, flags: u8, stream_id: u32, payload: &[u8]) {
        let len = (payload.len() as u32).to_be_bytes();
        self.ready.extend_from_slice(&[len[1], len[2], len[3], kind, flags]);
        self.ready.extend_from_slice(&stream_id.to_be_bytes());
        self.ready.extend_from_slice(payload);
    }
}

/// HPACK integer with an N-bit prefix (RFC 7541 §5.1).
fn encode_int(mut v: usize, prefix_bits: u8, first_byte_flags: u8, out: &mut Vec<u8>) {
    let max = (1usize << prefix_bits) - 1;
    if v < max {
        out.push(first_byte_flags | v as u8);
        return;
    }
    out.push(first_byte_flags | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// HPACK string literal, not Huffman-coded (RFC 7541 §5.2).
fn encode_string(s: &[u8], out: &mut Vec<u8>) {
    encode_int(s.len(), 7, 0x00, out);
    out.extend_from_slice(s);
}

impl<S: AsyncRead + Unpin> AsyncRead for FixAuthority<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.ready.is_empty() {
                let n = buf.remaining().min(this.ready.len());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut tmp = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut tmp);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                // End of stream; an incomplete frame left in `raw` is dropped.
                this.eof = true;
                continue;
            }
            this.raw.extend_from_slice(rb.filled());
            this.process()?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FixAuthority<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S> tonic::transport::server::Connected for FixAuthority<S> {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags];
        f.extend_from_slice(&stream_id.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn parse_frames(mut b: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !b.is_empty() {
            let len = u32::from_be_bytes([0, b[0], b[1], b[2]]) as usize;
            let id = u32::from_be_bytes([b[5], b[6], b[7], b[8]]);
            out.push((b[3], b[4], id, b[9..9 + len].to_vec()));
            b = &b[9 + len..];
        }
        out
    }

    async fn through(input: Vec<u8>) -> Vec<u8> {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut fixed = FixAuthority::new(server);
        client.write_all(&input).await.unwrap();
        drop(client);
        let mut out = Vec::new();
        fixed.read_to_end(&mut out).await.unwrap();
        out
    }

    fn request(authority: &str, path: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
        [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", authority), ("te", "trailers")]
            .iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    #[tokio::test]
    async fn rewrites_invalid_authorities_and_keeps_hpack_contexts_apart() {
        // The client's encoder indexes into its dynamic table: the second
        // block refers to entries the first one added.
        let mut enc = loona_hpack::Encoder::new();
        let r1 = request("tmp%2F.tmpX%2Fagent.sock", "/SpiffeWorkloadAPI/FetchX509SVID");
        let r2 = request("tmp%2F.tmpX%2Fagent.sock", "/SpiffeWorkloadAPI/FetchJWTSVID");
        let r3 = request("example.org:8081", "/SpiffeWorkloadAPI/FetchJWTSVID");
        let b1 = enc.encode(r1.iter().map(|(n, v)| (&n[..], &v[..])));
        let b2 = enc.encode(r2.iter().map(|(n, v)| (&n[..], &v[..])));
        let b3 = enc.encode(r3.iter().map(|(n, v)| (&n[..], &v[..])));
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        input.extend(frame(HEADERS, END_HEADERS, 1, &b1));
        input.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\0")); // DATA
                                                                // Split over HEADERS + CONTINUATION, padded, with priority.
        let (h, c) = b2.split_at(b2.len() / 2);
        let mut padded = vec![3u8];
        padded.extend_from_slice(&[0, 0, 0, 0, 16]);
        padded.extend_from_slice(h);
        padded.extend_from_slice(&[0, 0, 0]);
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 3, &padded));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, c));
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 5, &b3));

        let out = through(input).await;
        assert_eq!(&out[..PREFACE_LEN], PREFACE);
        let frames = parse_frames(&out[PREFACE_LEN..]);
        assert_eq!(frames.iter().map(|f| (f.0, f.2)).collect::<Vec<_>>(), [(4, 0), (1, 1), (0, 1), (1, 3), (1, 5)]);
        assert_eq!(frames[2].3, b"\0\0\0\0\0", "DATA unchanged");
        assert_eq!(frames[3].1, END_STREAM | PRIORITY | END_HEADERS);
        assert_eq!(&frames[3].3[..5], &[0, 0, 0, 0, 16], "priority fields kept");

        // A fresh decoder (the server's) reads every block on its own.
        let mut dec = Decoder::new();
        let got1 = dec.decode(&frames[1].3).unwrap();
        let got2 = dec.decode(&frames[3].3[5..]).unwrap();
        let got3 = dec.decode(&frames[4].3).unwrap();
        let auth = |h: &[(Vec<u8>, Vec<u8>)]| h.iter().find(|(n, _)| n == b":authority").unwrap().1.clone();
        assert_eq!(auth(&got1), b"localhost");
        assert_eq!(auth(&got2), b"localhost");
        assert_eq!(auth(&got3), b"example.org:8081", "valid authorities are kept");
        assert_eq!(got2.iter().find(|(n, _)| n == b":path").unwrap().1, b"/SpiffeWorkloadAPI/FetchJWTSVID");
        assert_eq!(got1.len(), 5);
    }

    #[tokio::test]
    async fn large_header_blocks_are_split_into_continuations() {
        let mut enc = loona_hpack::Encoder::new();
        let mut headers = request("/run/agent.sock", "/SpiffeWorkloadAPI/FetchX509SVID");
        headers.push((b"x-big".to_vec(), vec![b'a'; 40_000]));
        let block = enc.encode(headers.iter().map(|(n, v)| (&n[..], &v[..])));
        let mut input = PREFACE.to_vec();
        let (a, rest) = block.split_at(16_000);
        let (b, c) = rest.split_at(16_000);
        input.extend(frame(HEADERS, 0, 1, a));
        input.extend(frame(CONTINUATION, 0, 1, b));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, c));
        let frames = parse_frames(&through(input).await[PREFACE_LEN..]);
        assert!(frames.len() >= 3 && frames.iter().all(|f| f.3.len() <= MAX_OUT_PAYLOAD));
        assert_eq!(frames.last().unwrap().1, END_HEADERS);
        let joined: Vec<u8> = frames.iter().flat_map(|f| f.3.clone()).collect();
        let got = Decoder::new().decode(&joined).unwrap();
        assert_eq!(got[3], (b":authority".to_vec(), b"localhost".to_vec()));
        assert_eq!(got[5].1.len(), 40_000);
    }

    #[tokio::test]
    async fn interleaved_frames_in_a_header_block_close_the_connection() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &[0x82]));
        input.extend(frame(0x0, 0, 1, b"x"));
        let (mut client, server) = tokio::io::duplex(4096);
        let mut fixed = FixAuthority::new(server);
        client.write_all(&input).await.unwrap();
        drop(client);
        let mut out = Vec::new();
        assert!(fixed.read_to_end(&mut out).await.is_err());
    }
}
