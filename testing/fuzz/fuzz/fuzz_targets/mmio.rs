#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hvisor_vhost_fuzz::mmio::mmio(data));
