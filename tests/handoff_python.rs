//! docs/hypervisor-socket.md must be enough to attach the daemon: a hypervisor side written
//! in Python from that document alone hands over its memory and reads device registers.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn a_hypervisor_written_from_the_document_attaches() {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("SKIPPED: python3 is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let config = dir.path().join("virtio_cfg.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"zones": [{{"id": 3, "memory_region": [{{"zone0_ipa": "0x50000000", "zonex_ipa": "0x40000000", "size": "0x200000"}}],
               "devices": [{{"type": "blk", "addr": "0xa003c00", "len": "0x200", "irq": 78, "img": "{}", "status": "enable"}}]}}]}}"#,
            image.display()
        ),
    )
    .unwrap();
    let socket = dir.path().join("hv.sock");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/handoff/python_hypervisor.py"
    );
    let mut hypervisor = Command::new("python3")
        .args([
            script,
            socket.to_str().unwrap(),
            "3",
            "0xa003c00",
            "0x50000000",
            "0x200000",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(hypervisor.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "listening");
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_hvisor-vhost"))
        .args(["hvisor", "--config", config.to_str().unwrap()])
        .arg("--hypervisor-socket")
        .arg(&socket)
        .spawn()
        .unwrap();
    let registers = lines.next().unwrap().unwrap();
    assert_eq!(registers, "magic 0x74726976 version 2 device 2");
    assert!(hypervisor.wait().unwrap().success());
    // The hypervisor side closed its socket: the daemon stops by itself.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = daemon.try_wait().unwrap() {
            assert!(status.success(), "daemon exited with {status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "daemon kept running after the hang-up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
