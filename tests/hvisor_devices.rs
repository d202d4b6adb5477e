//! The net, console and rng devices served over the hvisor transport, driven through the
//! simulator by the guest-side virtio-mmio driver pieces (`MmioGuest`, `DriverQueue`): probe and
//! initialization as a zone's Linux does them, then data through each device's queues with the
//! configured interrupt delivered for every completion.

mod support;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use hvisor_sim::guest::MmioGuest;
use hvisor_transport::mmio::reg;
use support::hvisor::*;
use virtio_guest_driver::{Buffer, DriverQueue};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const ZONE: u32 = 1;
const ADDR: u64 = 0xa00_3c00;
const IRQ: u32 = 78;
const VIRTIO_ID_NET: u32 = 1;
const VIRTIO_ID_CONSOLE: u32 = 3;
const VIRTIO_ID_RNG: u32 = 4;
/// vhost-user's feature bit, which a virtio-mmio driver must never see.
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
const VIRTIO_CONSOLE_F_SIZE: u64 = 1 << 0;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
/// virtio-mmio's device-specific config space.
const CONFIG_SPACE: u64 = 0x100;
/// Entries per queue the tests set up.
const QUEUE_SIZE: u16 = 64;
/// The virtio-net header of a VERSION_1 driver (with `num_buffers`).
const NET_HEADER_LEN: usize = 12;
/// An EtherType for local experiments (IEEE 802), so no stack in the namespace answers it.
const ETHERTYPE: [u8; 2] = [0x88, 0xb5];

/// A rig serving one device of `fields` (its JSON entry's type fields) at [`ADDR`].
fn rig_with(fields: serde_json::Value) -> Rig {
    Rig::start(RigOptions {
        other_devices: vec![DeviceSpec {
            zone: ZONE,
            addr: ADDR,
            irq: IRQ,
            fields,
        }],
        ..RigOptions::new(&[])
    })
}

/// Probes the device, checks its id, initializes it with VERSION_1 and `wanted`, checks that
/// it has exactly the queues `queue_max` lists (QueueNumMax of each), sets each up with
/// [`QUEUE_SIZE`] entries in its own area and sets DRIVER_OK. Returns the offered features and
/// the queues.
fn start_device(
    mmio: &MmioGuest,
    device_id: u32,
    wanted: u64,
    queue_max: &[u32],
) -> TestResult<(u64, Vec<DriverQueue>)> {
    assert_eq!(mmio.probe()?, device_id, "device id");
    let offered = mmio.device_features()?;
    assert_ne!(offered & VIRTIO_F_VERSION_1, 0, "offered {offered:#x}");
    assert_eq!(
        offered & VHOST_USER_F_PROTOCOL_FEATURES,
        0,
        "vhost-user's PROTOCOL_FEATURES offered to a virtio-mmio driver: {offered:#x}"
    );
    let negotiated = mmio.initialize(VIRTIO_F_VERSION_1 | wanted)?;
    assert_eq!(negotiated, (VIRTIO_F_VERSION_1 | wanted) & offered);
    for (index, &max) in queue_max.iter().enumerate() {
        mmio.write(reg::QUEUE_SEL, index as u32)?;
        assert_eq!(mmio.read(reg::QUEUE_NUM_MAX)?, max, "queue {index}");
    }
    mmio.write(reg::QUEUE_SEL, queue_max.len() as u32)?;
    assert_eq!(
        mmio.read(reg::QUEUE_NUM_MAX)?,
        0,
        "a queue beyond the device's {}",
        queue_max.len()
    );
    let mut queues = Vec::new();
    for index in 0..queue_max.len() {
        queues.push(mmio.setup_queue(index as u32, QUEUE_SIZE, area(index as u64))?);
    }
    mmio.driver_ok()?;
    Ok((offered, queues))
}

fn readable(addr: GuestAddress, len: usize) -> Buffer {
    Buffer {
        addr,
        len: len as u32,
        device_writable: false,
    }
}

#[test]
fn rng_fills_a_posted_buffer_from_its_source() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (source, content) = entropy_source(dir.path())?;
    let rig = rig_with(serde_json::json!({ "type": "rng", "source": source }));
    let mmio = MmioGuest::new(&rig.sim, ZONE, ADDR);
    let (offered, mut queues) = start_device(&mmio, VIRTIO_ID_RNG, 0, &[256])?;
    assert_eq!(
        offered & !(VIRTIO_F_VERSION_1 | 1 << 28 | 1 << 29),
        0,
        "rng offers only VERSION_1, INDIRECT_DESC and EVENT_IDX: {offered:#x}"
    );
    check_rng_requests(&rig, &mmio, IRQ, &mut queues[0], &content)?;
    Ok(rig.stop()?)
}

/// A rig serving a console on the Unix socket `socket`.
fn console_on(socket: &std::path::Path) -> Rig {
    rig_with(serde_json::json!({ "type": "console", "socket": socket }))
}

#[test]
fn console_moves_bytes_between_its_queues_and_a_socket_client() -> TestResult {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("console.sock");
    let rig = console_on(&socket);
    let memory = rig.memory(ZONE);
    let mmio = MmioGuest::new(&rig.sim, ZONE, ADDR);
    let (offered, mut queues) = start_device(&mmio, VIRTIO_ID_CONSOLE, 0, &[128, 128])?;
    assert_eq!(offered & VIRTIO_CONSOLE_F_SIZE, 0, "a socket has no size");
    let [receiveq, transmitq] = &mut queues[..] else {
        unreachable!("two queues set up")
    };
    let mut client = UnixStream::connect(&socket)?;
    client.set_read_timeout(Some(TIMEOUT))?;

    let output = pattern(10, 5000);
    memory.write_slice(&output, buffer(0))?;
    let head = transmitq.add(memory, &[readable(buffer(0), output.len())])?;
    mmio.notify(1)?;
    take_interrupt(&rig, &mmio, IRQ, "the transmit chain")?;
    assert_eq!(wait_used(transmitq, memory)?, (head, 0));
    let mut arrived = vec![0u8; output.len()];
    client.read_exact(&mut arrived)?;
    assert!(
        arrived == output,
        "the client got other bytes than the guest sent"
    );

    let input = b"typed on the host side";
    client.write_all(input)?;
    memory.write_slice(&[0xa5; 256], buffer(1))?;
    let head = receiveq.add(memory, &[writable(buffer(1), 256)])?;
    mmio.notify(0)?;
    take_interrupt(&rig, &mmio, IRQ, "the receive buffer")?;
    assert_eq!(wait_used(receiveq, memory)?, (head, input.len() as u32));
    let mut received = vec![0u8; input.len()];
    memory.read_slice(&mut received, buffer(1))?;
    assert_eq!(received, input);
    Ok(rig.stop()?)
}

/// Input from the console's host side is the device's own initiative: it must not land in a
/// receive buffer before DRIVER_OK either (virtio 1.2 2.1.2), and lands right after it.
#[test]
fn console_input_waits_for_driver_ok() -> TestResult {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("console.sock");
    let rig = console_on(&socket);
    let memory = rig.memory(ZONE);
    let mmio = MmioGuest::new(&rig.sim, ZONE, ADDR);
    assert_eq!(mmio.probe()?, VIRTIO_ID_CONSOLE);
    mmio.initialize(VIRTIO_F_VERSION_1)?;
    let mut receiveq = None;
    for index in 0..2u32 {
        let at = area(u64::from(index));
        let queue = mmio.setup_queue(index, QUEUE_SIZE, at)?;
        if index == 0 {
            receiveq = Some(queue);
        }
    }
    let receiveq = receiveq.as_mut().ok_or("no receive queue")?;
    let head = receiveq.add(memory, &[writable(buffer(1), 256)])?;
    let mut client = UnixStream::connect(&socket)?;
    let input = b"typed before DRIVER_OK";
    client.write_all(input)?;
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(
        receiveq.pop_used(memory)?,
        None,
        "input delivered before DRIVER_OK"
    );
    assert!(rig.sim.take_interrupts().is_empty());
    mmio.driver_ok()?;
    take_interrupt(&rig, &mmio, IRQ, "input after DRIVER_OK")?;
    assert_eq!(wait_used(receiveq, memory)?, (head, input.len() as u32));
    let mut received = vec![0u8; input.len()];
    memory.read_slice(&mut received, buffer(1))?;
    assert_eq!(received, input);
    Ok(rig.stop()?)
}

/// Runs `test` on a thread moved into a network namespace of its own, so the TAP it creates
/// lives and dies there, away from the host's interfaces. Returns why it was skipped, if it was.
fn in_private_network_namespace(
    test: impl FnOnce() -> TestResult + Send + 'static,
) -> TestResult<Option<String>> {
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Ok(Some("/dev/net/tun is missing".into()));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(Some("a TAP in a network namespace needs root".into()));
    }
    std::thread::spawn(move || {
        // SAFETY: unshare changes only this thread's network namespace; the thread ends with
        // the test, taking the namespace and its TAP with it.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            let error = std::io::Error::last_os_error();
            return Ok(Some(format!("unshare(CLONE_NEWNET): {error}")));
        }
        test().map(|()| None)
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

fn ip(args: &[&str]) -> TestResult {
    let status = std::process::Command::new("ip").args(args).status()?;
    if !status.success() {
        return Err(format!("ip {args:?}: {status}").into());
    }
    Ok(())
}

/// A raw packet socket on interface `name`: sees every frame the interface receives or sends,
/// and sends frames out of it (to the TAP's reader).
fn packet_socket(name: &std::ffi::CStr) -> TestResult<OwnedFd> {
    let all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(all)) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: `fd` is a fresh socket nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `name` is NUL-terminated.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = all;
    address.sll_ifindex = ifindex as i32;
    // SAFETY: `address` is a valid sockaddr_ll of the size given.
    let bound = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&raw const address).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if bound != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(socket)
}

/// Waits for a frame on `socket` that `wanted` accepts.
fn receive_frame(socket: &OwnedFd, wanted: impl Fn(&[u8]) -> bool) -> TestResult<Vec<u8>> {
    let deadline = Instant::now() + TIMEOUT;
    let mut frame = vec![0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("the frame did not show on the TAP".into());
        }
        let mut poll = libc::pollfd {
            fd: socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `poll` is one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&raw mut poll, 1, left.as_millis() as i32) } <= 0 {
            continue;
        }
        // SAFETY: `frame` is writable for its whole length.
        let len = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                frame.as_mut_ptr().cast(),
                frame.len(),
                0,
            )
        };
        if len > 0 && wanted(&frame[..len as usize]) {
            frame.truncate(len as usize);
            return Ok(frame);
        }
    }
}

/// An Ethernet frame of [`ETHERTYPE`] with a payload of `seed`.
fn ethernet_frame(destination: [u8; 6], source: [u8; 6], seed: u32) -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&destination);
    frame.extend_from_slice(&source);
    frame.extend_from_slice(&ETHERTYPE);
    frame.extend_from_slice(&pattern(seed, 200));
    frame
}

#[test]
fn net_moves_frames_between_its_queues_and_a_tap() -> TestResult {
    const TAP: &str = "hvsim0";
    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x5a, 0x00, 0x01];
    const PEER: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
    let skipped = in_private_network_namespace(|| {
        ip(&["tuntap", "add", "dev", TAP, "mode", "tap"])?;
        ip(&["link", "set", TAP, "up"])?;
        let rig = rig_with(serde_json::json!({ "type": "net", "tap": TAP, "mac": MAC }));
        let memory = rig.memory(ZONE);
        let mmio = MmioGuest::new(&rig.sim, ZONE, ADDR);
        let (offered, mut queues) =
            start_device(&mmio, VIRTIO_ID_NET, VIRTIO_NET_F_MAC, &[256, 256])?;
        for feature in [
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_STATUS,
        ] {
            assert_ne!(offered & feature, 0, "{feature:#x} not in {offered:#x}");
        }
        let mac: Vec<u8> = (0..6)
            .map(|i| mmio.read_sized(CONFIG_SPACE + i, 1).map(|byte| byte as u8))
            .collect::<Result<_, _>>()?;
        assert_eq!(mac, MAC, "MAC in config space");
        let [rxq, txq] = &mut queues[..] else {
            unreachable!("two queues set up")
        };
        let packets = packet_socket(c"hvsim0")?;

        // TX: a header of zeroes (no offload), then the frame, as the TAP's vnet header.
        let sent = ethernet_frame([0xff; 6], MAC, 21);
        let mut chain = vec![0u8; NET_HEADER_LEN];
        chain.extend_from_slice(&sent);
        memory.write_slice(&chain, buffer(0))?;
        let head = txq.add(memory, &[readable(buffer(0), chain.len())])?;
        mmio.notify(1)?;
        take_interrupt(&rig, &mmio, IRQ, "the transmitted frame")?;
        assert_eq!(wait_used(txq, memory)?, (head, 0));
        receive_frame(&packets, |frame| frame == sent)?;

        // RX: a frame sent out of the namespace's side of the TAP lands in a posted buffer,
        // after whatever the namespace's own stack sent first (IPv6 router solicitations...).
        let mut posted = std::collections::HashMap::new();
        for n in 1..=8u64 {
            posted.insert(queue_add_rx(rxq, memory, buffer(n))?, buffer(n));
        }
        mmio.notify(0)?;
        let incoming = ethernet_frame(MAC, PEER, 22);
        // SAFETY: `incoming` is readable for its whole length.
        let written = unsafe {
            libc::send(
                packets.as_raw_fd(),
                incoming.as_ptr().cast(),
                incoming.len(),
                0,
            )
        };
        assert_eq!(written, incoming.len() as isize, "sending on the TAP");
        take_interrupt(&rig, &mmio, IRQ, "a received frame")?;
        let deadline = Instant::now() + TIMEOUT;
        loop {
            assert!(
                Instant::now() < deadline,
                "the frame sent on the TAP never arrived"
            );
            let (head, len) = wait_used(rxq, memory)?;
            let addr = posted.remove(&head).ok_or("an unknown RX chain was used")?;
            let mut delivered = vec![0u8; len as usize];
            memory.read_slice(&mut delivered, addr)?;
            if delivered.get(NET_HEADER_LEN..) == Some(&incoming[..]) {
                // One buffer per frame without MRG_RXBUF, and num_buffers says so.
                assert_eq!(delivered[10..12], [1, 0], "num_buffers");
                break;
            }
            posted.insert(queue_add_rx(rxq, memory, addr)?, addr);
            mmio.notify(0)?;
        }
        rig.sim.take_interrupts();
        Ok(rig.stop()?)
    })?;
    if let Some(reason) = skipped {
        eprintln!("skipped: {reason}");
    }
    Ok(())
}

/// Posts one 2 KiB receive buffer at `addr` (room for a full frame and its header).
fn queue_add_rx(
    queue: &mut DriverQueue,
    memory: &GuestMemoryMmap,
    addr: GuestAddress,
) -> TestResult<u16> {
    Ok(queue.add(memory, &[writable(addr, 2048)])?)
}
