include!("../model/build_support.rs");

fn main() {
    // Only the torch binary needs libtorch_cuda; the launcher must not load libtorch at all.
    link_libtorch_into(Some("droppos-pipeline-torch"));
}
