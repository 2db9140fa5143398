//! `weft inject`: Kubernetes manifests in, the same manifests with the weft
//! sidecar injected out (see [`weft_k8s::inject`]).

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;
use weft_k8s::{InjectOptions, Outcome};

/// How the injected sidecar is set up (shared with `weft install`).
#[derive(clap::Args, Debug, Clone)]
pub struct InjectFlags {
    /// The image holding `weft` and `weft-proxy`.
    #[arg(long, default_value_t = InjectOptions::default().image)]
    pub image: String,
    /// The control plane's gRPC address as pods reach it.
    #[arg(long, default_value_t = InjectOptions::default().control_plane)]
    pub control_plane_address: String,
    /// The UID the sidecar runs as; interception exempts its traffic.
    #[arg(long, default_value_t = InjectOptions::default().proxy_uid)]
    pub proxy_uid: u32,
    /// The ConfigMap (key ca.pem) with the mesh's trust bundle, in each workload's namespace.
    #[arg(long, default_value_t = InjectOptions::default().trust_bundle_config_map)]
    pub trust_bundle_config_map: String,
}

impl InjectFlags {
    pub fn options(&self) -> InjectOptions {
        InjectOptions {
            image: self.image.clone(),
            control_plane: self.control_plane_address.clone(),
            proxy_uid: self.proxy_uid,
            trust_bundle_config_map: self.trust_bundle_config_map.clone(),
            ..InjectOptions::default()
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct InjectArgs {
    /// A manifest file, a directory (its .yaml, .yml and .json files, in name
    /// order) or - for stdin; repeatable.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<PathBuf>,
    #[command(flatten)]
    pub flags: InjectFlags,
}

/// Prints every document of every input, injected, on stdout; what happened
/// to each workload goes to stderr.
pub fn run(args: InjectArgs) -> anyhow::Result<()> {
    let opts = args.flags.options();
    let mut out = Vec::new();
    for input in &args.files {
        for (name, text) in read_input(input)? {
            let mut docs = weft_k8s::manifests::read(&name, &text)?;
            for doc in &mut docs {
                for w in weft_k8s::inject(doc, &opts).with_context(|| name.clone())? {
                    match w.outcome {
                        Outcome::Injected => eprintln!("{}: injected", w.object),
                        Outcome::AlreadyInjected => eprintln!("{}: already injected, unchanged", w.object),
                        Outcome::OptedOut(why) => eprintln!("{}: not injected: {why}", w.object),
                        Outcome::NotAWorkload => {}
                    }
                }
            }
            out.extend(docs);
        }
    }
    print!("{}", weft_k8s::manifests::write(&out));
    Ok(())
}

/// (name, text) of each file `input` stands for.
fn read_input(input: &Path) -> anyhow::Result<Vec<(String, String)>> {
    if input == Path::new("-") {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).context("reading stdin")?;
        return Ok(vec![("-".into(), text)]);
    }
    if input.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(input)
            .with_context(|| input.display().to_string())?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml" || x == "yml" || x == "json"))
            .collect();
        files.sort();
        return files.iter().map(|f| read_file(f)).collect();
    }
    Ok(vec![read_file(input)?])
}

fn read_file(path: &Path) -> anyhow::Result<(String, String)> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    Ok((path.display().to_string(), text))
}
