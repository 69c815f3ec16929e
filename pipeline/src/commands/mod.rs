//! One module per subcommand.

pub mod bench;
pub mod bench_jpeg;
pub mod bench_loader;
pub mod bench_onnx;
pub mod bench_rounds;
pub mod bench_sha256;
pub mod bench_store_floor;
pub mod bench_train_step;
pub mod doctor;
pub mod eval;
pub mod export;
pub mod finetune;
pub mod plot;
pub mod shard;
pub mod stats;
pub mod train;
pub mod verify;
