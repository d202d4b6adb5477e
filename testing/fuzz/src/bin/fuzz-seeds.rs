//! Writes the curated seeds of every target (or of the targets named after DIR) to
//! DIR/<target>/seed-<n>, the starting corpora of `scripts/fuzz`.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let Some(dir) = args.next().map(PathBuf::from) else {
        eprintln!("usage: fuzz-seeds DIR [TARGET...]");
        std::process::exit(2);
    };
    let wanted: Vec<String> = args.map(|arg| arg.to_string_lossy().into_owned()).collect();
    for (target, _) in hvisor_vhost_fuzz::TARGETS {
        if !wanted.is_empty() && !wanted.iter().any(|name| name == target) {
            continue;
        }
        let target_dir = dir.join(target);
        std::fs::create_dir_all(&target_dir)?;
        for (n, seed) in hvisor_vhost_fuzz::seeds::seeds(target).iter().enumerate() {
            std::fs::write(target_dir.join(format!("seed-{n}")), seed)?;
        }
    }
    Ok(())
}
