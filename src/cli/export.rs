//! `capsnet export`: a checkpoint's weights alone, in capsnet's layout or PyTorch's.

use capsnet::checkpoint::{self, Layout};
use capsnet::{Error, Result};

use super::args::{ExportArgs, LayoutArg};

pub fn run(a: ExportArgs) -> Result<()> {
    if a.out.exists() {
        return Err(Error::file(
            &a.out,
            "--out: the file exists; remove it or choose another name (nothing is overwritten)",
        ));
    }
    let ck = checkpoint::load(&a.checkpoint)?.weights_only();
    let layout = match a.layout {
        LayoutArg::Capsnet => Layout::Capsnet,
        LayoutArg::Pytorch => Layout::Pytorch,
    };
    checkpoint::save_as(&a.out, &ck, layout)?;
    let size = std::fs::metadata(&a.out).map(|m| m.len()).unwrap_or(0);
    println!(
        "wrote {} ({:.1} MB, weights of epoch {}, {} layout)",
        a.out.display(),
        size as f64 / 1e6,
        ck.state.epoch,
        match a.layout {
            LayoutArg::Capsnet => "capsnet",
            LayoutArg::Pytorch => "PyTorch",
        }
    );
    Ok(())
}
