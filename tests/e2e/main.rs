// The server in these tests allocates as the binary does: mimalloc, with instances'
// allocations apart from the connections' (runtime/src/instance_heap.rs).
#[global_allocator]
static ALLOCATOR: sockhost::instance_heap::SegregatingAllocator =
    sockhost::instance_heap::SegregatingAllocator;

mod aikefu;
mod aikefu_process;
mod browser;
mod channels;
mod cluster;
mod core;
mod fake_llm;
mod hardening;
mod hardening_files;
mod hibernation;
mod limits;
mod loading;
mod ops;
mod polyglot;
mod process;
mod reload;
mod scaffold;
mod scale;
mod stress;
mod support;
mod tls;
mod web;
