fn main() {
    eprintln!("vps-controller: not built yet");
    std::process::exit(1);
}
