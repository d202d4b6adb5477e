//! The hand-off (docs/hypervisor-socket.md) from a hostile or mistaken hypervisor side: every
//! hello that would not work is refused before the daemon replies, with one line naming the
//! socket and the field and exit status 1, never by a crash (SIGBUS from a file too short for
//! its mapping) and never after a reply that told the hypervisor side all was well.

mod support;

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use serde_json::json;
use support::handoff::*;
use vmm_sys_util::epoll::Epoll;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

fn eventfd() -> EventFd {
    EventFd::new(EFD_NONBLOCK).expect("eventfd")
}

/// Hands over `bridge`, `wakeup` and one RAM descriptor at positions 0, 1 and 2 with `windows`.
fn offer(bridge: RawFd, wakeup: RawFd, ram: RawFd, windows: serde_json::Value) -> Outcome {
    hand_over(&hello(0, 1, windows), &[bridge, wakeup, ram])
}

#[test]
fn a_correct_hello_is_answered_and_served_until_the_hang_up() {
    let (bridge, wakeup, ram) = (memfd(4096), eventfd(), memfd(RAM_SIZE));
    let outcome = offer(
        bridge.as_raw_fd(),
        wakeup.as_raw_fd(),
        ram.as_raw_fd(),
        json!([window(2, 0, RAM_SIZE)]),
    );
    assert!(outcome.replied, "{}", outcome.log);
    assert!(outcome.status.success(), "{}", outcome.log);
}

#[test]
fn windows_may_share_a_descriptor_at_different_offsets() {
    // The configured window sits behind another zone's in the same file.
    let (bridge, wakeup, ram) = (memfd(4096), eventfd(), memfd(2 * RAM_SIZE));
    let other_zone = json!({"zone": 2, "zone0_ipa": 0x9000_0000u64, "size": RAM_SIZE, "fd": 2});
    let outcome = offer(
        bridge.as_raw_fd(),
        wakeup.as_raw_fd(),
        ram.as_raw_fd(),
        json!([other_zone, window(2, RAM_SIZE, RAM_SIZE)]),
    );
    assert!(outcome.replied, "{}", outcome.log);
    assert!(outcome.status.success(), "{}", outcome.log);
}

#[test]
fn windows_that_do_not_fit_the_configuration_are_refused() {
    let (bridge, wakeup, ram) = (memfd(4096), eventfd(), memfd(2 * RAM_SIZE));
    for (windows, parts) in [
        (
            json!([window(2, 0, RAM_SIZE / 2)]),
            vec!["windows[0].size", "0x100000 bytes", "zone 1", "0x50000000"],
        ),
        (
            json!([]),
            vec!["no window for zone 1 at zone0_ipa 0x50000000"],
        ),
        (
            json!([{"zone": 2, "zone0_ipa": ZONE0_IPA, "size": RAM_SIZE, "fd": 2}]),
            vec!["no window for zone 1"],
        ),
        (
            json!([window(2, 0x10, RAM_SIZE)]),
            vec![
                "windows[0].offset",
                "0x10 is not a multiple of the page size",
            ],
        ),
        (
            json!([window(2, 0, 0)]),
            vec!["windows[0].size", "must not be 0"],
        ),
        (
            json!([window(2, RAM_SIZE + 4096, RAM_SIZE)]),
            vec!["windows[0]", "runs past the end of descriptor 2"],
        ),
        (
            json!([window(2, 0, RAM_SIZE), window(2, RAM_SIZE, RAM_SIZE)]),
            vec!["windows[1] repeats zone 1 zone0_ipa 0x50000000 of windows[0]"],
        ),
        (
            json!([window(3, 0, RAM_SIZE)]),
            vec!["windows[0].fd", "descriptor 3, which was not sent"],
        ),
        (
            json!([window(1, 0, RAM_SIZE)]),
            vec!["windows[0].fd", "already \"wakeup_fd\""],
        ),
    ] {
        offer(
            bridge.as_raw_fd(),
            wakeup.as_raw_fd(),
            ram.as_raw_fd(),
            windows,
        )
        .assert_refused(&parts);
    }
}

/// A memfd shorter than the window it backs would be SIGBUS at the first guest access.
#[test]
fn a_window_file_shorter_than_its_size_is_refused() {
    let (bridge, wakeup, short) = (memfd(4096), eventfd(), memfd(RAM_SIZE / 2));
    offer(
        bridge.as_raw_fd(),
        wakeup.as_raw_fd(),
        short.as_raw_fd(),
        json!([window(2, 0, RAM_SIZE)]),
    )
    .assert_refused(&[
        "windows[0]",
        "size 0x200000 runs past the end of descriptor 2, which holds 0x100000 bytes",
    ]);
}

#[test]
fn a_bridge_that_cannot_hold_the_page_is_refused() {
    let (wakeup, ram) = (eventfd(), memfd(RAM_SIZE));
    let windows = json!([window(2, 0, RAM_SIZE)]);
    for size in [0, 100, 4095] {
        let bridge = memfd(size);
        offer(
            bridge.as_raw_fd(),
            wakeup.as_raw_fd(),
            ram.as_raw_fd(),
            windows.clone(),
        )
        .assert_refused(&[
            "bridge_fd",
            &format!("holds {size} bytes; the bridge page needs 4096"),
        ]);
    }
    let zero = File::options()
        .read(true)
        .write(true)
        .open("/dev/zero")
        .expect("/dev/zero");
    offer(
        zero.as_raw_fd(),
        wakeup.as_raw_fd(),
        ram.as_raw_fd(),
        windows.clone(),
    )
    .assert_refused(&["bridge_fd", "a character device (/dev/zero)", "memfd"]);
    let (socket, _peer) = UnixStream::pair().expect("socket pair");
    offer(
        socket.as_raw_fd(),
        wakeup.as_raw_fd(),
        ram.as_raw_fd(),
        windows.clone(),
    )
    .assert_refused(&["bridge_fd", "a socket"]);
    // Mapped shared and writable, so a read-only descriptor cannot work.
    let bridge = memfd(4096);
    let read_only = File::open(format!("/proc/self/fd/{}", bridge.as_raw_fd())).expect("reopen");
    offer(
        read_only.as_raw_fd(),
        wakeup.as_raw_fd(),
        ram.as_raw_fd(),
        windows,
    )
    .assert_refused(&["bridge_fd", "not open for reading and writing"]);
}

#[test]
fn window_descriptors_of_the_wrong_kind_are_refused() {
    let (bridge, wakeup) = (memfd(4096), eventfd());
    let zero = File::options()
        .read(true)
        .write(true)
        .open("/dev/zero")
        .expect("/dev/zero");
    let (reader, _writer) = std::io::pipe().expect("pipe");
    let ram = memfd(RAM_SIZE);
    let read_only = File::open(format!("/proc/self/fd/{}", ram.as_raw_fd())).expect("reopen");
    for (fd, parts) in [
        (zero.as_raw_fd(), vec!["a character device (/dev/zero)"]),
        (reader.as_raw_fd(), vec!["a pipe"]),
        (
            wakeup.as_raw_fd(),
            vec!["an anonymous file (anon_inode:[eventfd])"],
        ),
        (
            read_only.as_raw_fd(),
            vec!["not open for reading and writing"],
        ),
    ] {
        offer(
            bridge.as_raw_fd(),
            wakeup.as_raw_fd(),
            fd,
            json!([window(2, 0, RAM_SIZE)]),
        )
        .assert_refused(&[&["windows[0].fd", "descriptor 2"], &parts[..]].concat());
    }
}

#[test]
fn a_wakeup_that_is_not_an_eventfd_is_refused() {
    let (bridge, ram) = (memfd(4096), memfd(RAM_SIZE));
    let (reader, _writer) = std::io::pipe().expect("pipe");
    let (socket, _peer) = UnixStream::pair().expect("socket pair");
    let epoll = Epoll::new().expect("epoll");
    let file = memfd(8);
    for (fd, kind) in [
        (reader.as_raw_fd(), "a pipe"),
        (socket.as_raw_fd(), "a socket"),
        (
            epoll.as_raw_fd(),
            "an anonymous file (anon_inode:[eventpoll])",
        ),
        (file.as_raw_fd(), "a regular file"),
    ] {
        offer(
            bridge.as_raw_fd(),
            fd,
            ram.as_raw_fd(),
            json!([window(2, 0, RAM_SIZE)]),
        )
        .assert_refused(&["wakeup_fd", kind, "not an eventfd"]);
    }
    let wakeup = eventfd();
    hand_over(
        &hello(0, 0, json!([window(1, 0, RAM_SIZE)])),
        &[wakeup.as_raw_fd(), ram.as_raw_fd()],
    )
    .assert_refused(&["wakeup_fd", "descriptor 0, which is already \"bridge_fd\""]);
}

#[test]
fn json_mistakes_name_the_field() {
    let (bridge, wakeup, ram) = (memfd(4096), eventfd(), memfd(RAM_SIZE));
    let fds = [bridge.as_raw_fd(), wakeup.as_raw_fd(), ram.as_raw_fd()];
    let mut wrong_fd = hello(0, 1, json!([window(2, 0, RAM_SIZE)]));
    wrong_fd["bridge_fd"] = json!("0");
    hand_over(&wrong_fd, &fds).assert_refused(&[
        "field \"bridge_fd\": expected a descriptor position",
        "found the string \"0\"",
    ]);
    let mut hex_size = hello(0, 1, json!([window(2, 0, RAM_SIZE)]));
    hex_size["windows"][0]["size"] = json!("0x200000");
    hand_over(&hex_size, &fds).assert_refused(&[
        "field \"windows[0].size\": expected an unsigned 64-bit integer",
        "found the string \"0x200000\"",
    ]);
    let mut no_windows = hello(0, 1, json!([]));
    no_windows
        .as_object_mut()
        .expect("object")
        .remove("windows");
    hand_over(&no_windows, &fds).assert_refused(&["field \"windows\" is missing"]);
    let mut future = hello(0, 1, json!([window(2, 0, RAM_SIZE)]));
    future["version"] = json!(2);
    hand_over(&future, &fds).assert_refused(&["field \"version\"", "version 2"]);
}
