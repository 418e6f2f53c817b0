//! `airlock-agent`: not built yet (issue 4). The crate exists so the workspace has its final shape.

fn main() -> std::process::ExitCode {
    eprintln!("airlock-agent: not implemented yet (issue 4)");
    std::process::ExitCode::from(2)
}
