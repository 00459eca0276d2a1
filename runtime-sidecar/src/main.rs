//! The `opmesh-runtime` binary.

fn main() {}
