//! Tests that boot the real guest kernel with `microvm boot`.
//!
//! On a host whose KVM cannot boot an unmodified guest (this project's PVM development
//! machines), the test binary re-runs itself inside the testbed, an emulated nested-KVM host
//! (see `testbed/`), with the same arguments; on a host with hardware KVM it runs directly.

use std::fs;
use std::io::{BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::Duration;

use microvm_tests::guest::{
    connect_to_guest, fnv1a, initramfs, pattern_byte, run_trials, trial, Artifacts, Boot, FNV_INIT,
};
use microvm_tests::proc_status;

fn main() -> ExitCode {
    let trials = vec![
        trial("boot_vmlinux_pvh_prints_and_resets", boot_vmlinux_pvh),
        trial("boot_bzimage_linux64_prints_and_resets", boot_bzimage),
        trial("smp_and_memory_are_visible", smp_and_memory),
        trial("block_ro_and_rw_disks", block_disks),
        trial("block_rate_limited_disk_reads_whole", block_rate_limited),
        trial("vsock_1mib_both_ways", vsock_both_ways),
        trial("hwrng_yields_bytes", hwrng),
        trial("net_tcp_1mib_echo_mac_and_mtu", net_tcp_echo),
        trial(
            "hostile_queue_scribbling_does_not_crash_vmm",
            hostile_scribble,
        ),
        trial("guest_triple_fault_ends_vmm_with_error", triple_fault),
        trial(
            "vmm_threads_are_seccomp_filtered",
            vmm_threads_are_seccomp_filtered,
        ),
        trial("vmm_is_jailed_while_the_guest_runs", vmm_is_jailed),
    ];
    run_trials("guest tests", trials)
}

/// The value after `key=` on the line of `stdout` that has it.
fn value_of(stdout: &str, key: &str) -> String {
    stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in guest output:\n{stdout}"))
        .to_string()
}

const HELLO_BODY: &str = "echo HELLO-FROM-GUEST; uname -r; \
    printf '\\001' | dd of=/dev/port bs=1 seek=1008 count=1 2>/dev/null; echo MARKER-WRITTEN";

fn boot_vmlinux_pvh(art: &Artifacts, dir: &Path) {
    let initrd = initramfs(art, dir, HELLO_BODY);
    let out = Boot::new(art, &initrd).run_retrying_early_triple_fault();
    out.expect_ok(&["HELLO-FROM-GUEST", "MARKER-WRITTEN", "GUEST-END rc=0"]);
    assert!(
        out.stderr.contains("guest boot marker 1 at"),
        "the boot marker was not logged:\n{}",
        out.stderr
    );
    eprintln!("pvh boot: {:.2} s wall", out.elapsed.as_secs_f64());
}

fn boot_bzimage(art: &Artifacts, dir: &Path) {
    let initrd = initramfs(art, dir, HELLO_BODY);
    let out = Boot::with_kernel(art, &art.bzimage, &initrd).run_retrying_early_triple_fault();
    out.expect_ok(&["HELLO-FROM-GUEST", "GUEST-END rc=0"]);
}

fn smp_and_memory(art: &Artifacts, dir: &Path) {
    let body = "echo CPUS=$(grep -c ^processor /proc/cpuinfo); \
                echo ONLINE=$(cat /sys/devices/system/cpu/online); \
                echo MEMKB=$(awk '/MemTotal/ {print $2}' /proc/meminfo)";
    let initrd = initramfs(art, dir, body);
    let out = Boot::new(art, &initrd)
        .args(["--cpus", "2", "--memory", "256"])
        .run_retrying_early_triple_fault();
    out.expect_ok(&["GUEST-END rc=0"]);
    assert_eq!(value_of(&out.stdout, "CPUS"), "2");
    assert_eq!(value_of(&out.stdout, "ONLINE"), "0-1");
    let kb: u64 = value_of(&out.stdout, "MEMKB").parse().unwrap();
    // The kernel keeps some memory for itself; what it reports must be near 256 MiB.
    assert!((200 * 1024..=256 * 1024).contains(&kb), "MemTotal {kb} kB");
}

fn mkfs_ext4(image: &Path, contents: Option<&Path>) {
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-b", "4096"]);
    if let Some(dir) = contents {
        cmd.arg("-d").arg(dir);
    }
    let status = cmd
        .arg(image)
        .arg("16M")
        .status()
        .expect("mkfs.ext4 (e2fsprogs)");
    assert!(status.success(), "mkfs.ext4 failed");
}

fn block_disks(art: &Artifacts, dir: &Path) {
    let src = dir.join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("hello.txt"), "written-by-host\n").unwrap();
    let ro = dir.join("ro.img");
    let rw = dir.join("rw.img");
    mkfs_ext4(&ro, Some(&src));
    mkfs_ext4(&rw, None);
    let ro_before = std::fs::read(&ro).unwrap();
    let body = "mkdir -p /mnt/ro /mnt/rw; \
        mount -t ext4 -o ro /dev/vda /mnt/ro && cat /mnt/ro/hello.txt; \
        echo SERIAL=$(cat /sys/block/vda/serial); \
        echo RO_FLAG=$(cat /sys/block/vda/ro); \
        if dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=fsync 2>/dev/null; \
           then echo RO-WRITE-SUCCEEDED; else echo RO-WRITE-FAILED; fi; \
        mount -t ext4 /dev/vdb /mnt/rw && echo written-by-guest > /mnt/rw/out.txt && sync; \
        umount /mnt/rw && echo RW-UNMOUNTED; umount /mnt/ro";
    let initrd = initramfs(art, dir, body);
    let out = Boot::new(art, &initrd)
        .arg("--disk")
        .arg(format!("{},ro", ro.display()))
        .arg("--disk")
        .arg(&rw)
        .run_retrying_early_triple_fault();
    out.expect_ok(&[
        "written-by-host",
        "RO-WRITE-FAILED",
        "RW-UNMOUNTED",
        "GUEST-END rc=0",
    ]);
    assert_eq!(value_of(&out.stdout, "RO_FLAG"), "1");
    assert!(
        !value_of(&out.stdout, "SERIAL").is_empty(),
        "GET_ID gave no serial"
    );
    assert!(
        std::fs::read(&ro).unwrap() == ro_before,
        "the read-only image changed"
    );
    let cat = Command::new("debugfs")
        .args(["-R", "cat /out.txt"])
        .arg(&rw)
        .output()
        .expect("debugfs (e2fsprogs)");
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "written-by-guest\n");
}

/// A 4 MiB disk behind a 1 MiB/s limit (a full 1 MiB bucket at first): the guest still reads
/// every byte right, and the VMM says it throttled.
fn block_rate_limited(art: &Artifacts, dir: &Path) {
    let image = dir.join("pattern.img");
    let data: Vec<u8> = (0..4u64 << 20).map(pattern_byte).collect();
    fs::write(&image, &data).unwrap();
    let host = Command::new("sha256sum").arg(&image).output().unwrap();
    let want = String::from_utf8_lossy(&host.stdout);
    let want = want.split_whitespace().next().expect("sha256sum output");
    let body = "echo SUM=$(sha256sum /dev/vda | cut -d' ' -f1)";
    let initrd = initramfs(art, dir, body);
    let out = Boot::new(art, &initrd)
        .env("RUST_LOG", "warn,boot_marker=info,disk_rate=info")
        .arg("--disk")
        .arg(format!("{},ro", image.display()))
        .args(["--disk-rate", "bytes=1m,ops=1000"])
        .run_retrying_early_triple_fault();
    out.expect_ok(&["GUEST-END rc=0"]);
    assert_eq!(
        value_of(&out.stdout, "SUM"),
        want,
        "the guest read other data"
    );
    assert!(
        out.stderr.contains("virtio-blk: rate limit reached"),
        "the VMM did not report throttling:\n{}",
        out.stderr
    );
}

const VSOCK_BYTES: u64 = 1 << 20;

/// Echoes one connection back to its sender, then shuts its write side with `shut_write`;
/// returns (bytes, checksum).
fn echo_stream<S: Read + Write>(mut s: S, shut_write: impl FnOnce(&S)) -> (u64, u64) {
    let mut buf = vec![0u8; 64 * 1024];
    let (mut total, mut hash) = (0u64, FNV_INIT);
    loop {
        let n = s.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        hash = fnv1a(hash, &buf[..n]);
        s.write_all(&buf[..n]).expect("write");
        total += n as u64;
    }
    shut_write(&s);
    (total, hash)
}

fn expected_hash(bytes: u64) -> u64 {
    let data: Vec<u8> = (0..bytes).map(pattern_byte).collect();
    fnv1a(FNV_INIT, &data)
}

fn vsock_both_ways(art: &Artifacts, dir: &Path) {
    let uds = dir.join("vsock.sock");
    // Guest -> host: the guest connects to host port 5000; we echo. The jailed VMM connects
    // as its own unprivileged uid: the directory must let it through, the socket take it.
    let listener_path = format!("{}_5000", uds.display());
    let listener = UnixListener::bind(&listener_path).unwrap();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&listener_path, fs::Permissions::from_mode(0o777)).unwrap();
    let host_echo = std::thread::spawn(move || {
        let s = listener.accept().unwrap().0;
        echo_stream(s, |s| s.shutdown(std::net::Shutdown::Write).unwrap())
    });
    let body = format!(
        "guest-tool vsock-echo 6000 & ECHO=$!; \
         guest-tool vsock-send 2 5000 {VSOCK_BYTES}; wait $ECHO"
    );
    let initrd = initramfs(art, dir, &body);
    let vm = Boot::new(art, &initrd)
        .arg("--vsock")
        .arg(format!("3,{}", uds.display()))
        .spawn();
    // Host -> guest: connect to guest port 6000 once the guest listens.
    let (mut s, mut r) = connect_to_guest(&uds, 6000);
    let writer = std::thread::spawn(move || {
        let data: Vec<u8> = (0..VSOCK_BYTES).map(pattern_byte).collect();
        s.write_all(&data).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut echoed = Vec::new();
    r.read_to_end(&mut echoed).unwrap();
    writer.join().unwrap();
    let out = vm.wait();
    out.expect_ok(&["VSOCK-SEND-OK", "VSOCK-ECHO-DONE", "GUEST-END rc=0"]);
    let want = expected_hash(VSOCK_BYTES);
    // Host -> guest -> host.
    assert_eq!(echoed.len() as u64, VSOCK_BYTES);
    assert_eq!(fnv1a(FNV_INIT, &echoed), want, "host->guest echo corrupted");
    // Guest -> host -> guest, checked on both ends.
    let (n, hash) = host_echo.join().unwrap();
    assert_eq!(
        (n, hash),
        (VSOCK_BYTES, want),
        "guest->host stream corrupted"
    );
    assert_eq!(value_of(&out.stdout, "fnv"), format!("{want:016x}"));
}

/// While a two-vCPU guest runs, every VMM thread (the event thread and both vCPUs) shows a
/// seccomp filter in `/proc/<pid>/task/*/status`; the guest's vsock echo then still works
/// through the filtered event thread, and the guest's reset ends the VMM with 0.
fn vmm_threads_are_seccomp_filtered(art: &Artifacts, dir: &Path) {
    let uds = dir.join("vsock.sock");
    let initrd = initramfs(art, dir, "guest-tool vsock-echo 6000");
    let vm = Boot::new(art, &initrd)
        .args(["--cpus", "2", "--vsock"])
        .arg(format!("3,{}", uds.display()))
        .spawn();
    // The guest's user space runs (both vCPUs are past their first KVM_RUN) and the event
    // loop answered the handshake: every thread has installed its filter.
    let (s, r) = connect_to_guest(&uds, 6000);
    let threads = proc_status::threads(vm.vmm_pid()).expect("the VMM's /proc/<pid>/task");
    let names: Vec<&str> = threads.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(threads.len(), 3, "event thread and two vCPUs: {names:?}");
    for t in &threads {
        assert!(
            t.seccomp_filtered(),
            "thread {} ({}): Seccomp {:?}, Seccomp_filters {:?}",
            t.tid,
            t.name,
            t.field("Seccomp"),
            t.field("Seccomp_filters")
        );
    }
    echo_once(s, r, b"confined");
    vm.wait().expect_ok(&["VSOCK-ECHO-DONE", "GUEST-END rc=0"]);
}

/// Sends `payload` to a guest `vsock-echo`, ends the sending side, and checks it comes back.
fn echo_once(mut s: UnixStream, mut r: BufReader<UnixStream>, payload: &[u8]) {
    s.write_all(payload).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut echoed = Vec::new();
    r.read_to_end(&mut echoed).unwrap();
    assert_eq!(echoed, payload);
}

/// The VMM's jail, read from outside while the guest runs its workload (an echo over vsock,
/// which the host reaches only after the inspection): `microvm boot` → the jail's supervisor →
/// the VMM, PID 1 of its own namespace. Every thread of both: no_new_privs, no capabilities,
/// the VM's unprivileged uid/gid; the VMM's threads seccomp-filtered too, the VMM in its own
/// mount, PID, IPC, UTS and network namespaces with its own root, in its cgroup leaf with the
/// VM's memory limit.
fn vmm_is_jailed(art: &Artifacts, dir: &Path) {
    let uds = dir.join("vsock.sock");
    let initrd = initramfs(art, dir, "guest-tool vsock-echo 6000");
    let vm = Boot::new(art, &initrd)
        .arg("--vsock")
        .arg(format!("3,{}", uds.display()))
        .spawn();
    let (s, r) = connect_to_guest(&uds, 6000);
    let supervisor = vm.child_pid(vm.pid()).expect("the jail's supervisor");
    let vmm = vm.vmm_pid();
    assert_eq!(vm.child_pid(supervisor), Some(vmm));
    let mut uids = Vec::new();
    for pid in [supervisor, vmm] {
        let threads = proc_status::threads(pid).expect("/proc/<pid>/task");
        if pid == vmm {
            // The event thread and the vCPU thread, each behind its seccomp filter (installed
            // after the jail: the guest's user space runs, so both are past it).
            assert!(threads.len() >= 2, "VMM threads: {threads:?}");
            for t in &threads {
                assert!(
                    t.seccomp_filtered(),
                    "thread {} not filtered: {t:?}",
                    t.name
                );
            }
        }
        for t in &threads {
            let field = |key: &str| t.field(key).unwrap_or_else(|| panic!("no {key}: {t:?}"));
            assert_eq!(field("NoNewPrivs"), "1", "{t:?}");
            for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
                assert_eq!(field(set), "0000000000000000", "{set} of {t:?}");
            }
            for ids in [field("Uid"), field("Gid")] {
                let ids: Vec<&str> = ids.split_whitespace().collect();
                assert!(ids.iter().all(|id| *id == ids[0] && *id != "0"), "{t:?}");
                uids.push(ids[0].to_string());
            }
            assert_eq!(field("Groups"), "", "{t:?}");
        }
    }
    assert!(
        uids.iter().all(|u| *u == uids[0]),
        "one id for the VM: {uids:?}"
    );
    let ns = |pid: &str, ns: &str| fs::metadata(format!("/proc/{pid}/ns/{ns}")).unwrap().ino();
    for kind in ["mnt", "pid", "ipc", "uts", "net"] {
        assert_ne!(
            ns(&vmm.to_string(), kind),
            ns("self", kind),
            "{kind} namespace"
        );
    }
    let root = fs::metadata(format!("/proc/{vmm}/root")).unwrap();
    let host_root = fs::metadata("/").unwrap();
    assert_ne!((root.dev(), root.ino()), (host_root.dev(), host_root.ino()));
    let cgroup = fs::read_to_string(format!("/proc/{vmm}/cgroup")).unwrap();
    let leaf = cgroup.trim().strip_prefix("0::").unwrap_or_default();
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        assert!(leaf.starts_with("/microvm/vm"), "VMM cgroup: {cgroup}");
        let max = fs::read_to_string(format!("/sys/fs/cgroup{leaf}/memory.max")).unwrap();
        assert_eq!(max.trim(), ((128u64 + 128) << 20).to_string());
    }
    // The workload still runs in the jail.
    echo_once(s, r, b"jailed");
    vm.wait().expect_ok(&["VSOCK-ECHO-DONE", "GUEST-END rc=0"]);
    if !leaf.is_empty() {
        assert!(
            !Path::new(&format!("/sys/fs/cgroup{leaf}")).exists(),
            "the leaf stays"
        );
    }
}

const NET_BYTES: u64 = 1 << 20;
const NET_TAP: &str = "mvtap0";

fn ip(args: &str) {
    let out = Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .expect("ip (iproute2)");
    assert!(out.status.success(), "ip {args}: {out:?}");
}

/// Runs `f` in a thread of its own inside a new network namespace (the namespace is per thread;
/// a VMM started there inherits it), with the tun driver loaded.
fn in_own_netns(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        // SAFETY: unshare(2) with a flag; it affects only this thread and its children.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "unshare: {}", std::io::Error::last_os_error());
        if !Path::new("/dev/net/tun").exists() {
            // In the testbed, tun is a module of L1's kernel.
            let _ = Command::new("modprobe").arg("tun").status();
        }
        f();
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
}

/// The guest brings eth0 up with the configured MAC and MTU and echoes 1 MiB over TCP through a
/// host tap, which the test creates and addresses in a network namespace of its own.
fn net_tcp_echo(art: &Artifacts, dir: &Path) {
    let (art, dir) = (art.clone(), dir.to_path_buf());
    in_own_netns(move || net_tcp_echo_in_own_netns(&art, &dir));
}

fn net_tcp_echo_in_own_netns(art: &Artifacts, dir: &Path) {
    ip(&format!("tuntap add dev {NET_TAP} mode tap"));
    ip(&format!("addr add 10.0.2.1/24 dev {NET_TAP}"));
    ip(&format!("link set {NET_TAP} up"));
    let listener = TcpListener::bind("10.0.2.1:5000").unwrap();
    let host_echo = std::thread::spawn(move || {
        let s = listener.accept().unwrap().0;
        echo_stream(s, |s| s.shutdown(std::net::Shutdown::Write).unwrap())
    });
    let body = format!(
        "ip link set eth0 up && ip addr add 10.0.2.2/24 dev eth0 && \
         echo MAC=$(cat /sys/class/net/eth0/address) MTU=$(cat /sys/class/net/eth0/mtu) && \
         guest-tool tcp-send 10.0.2.1 5000 {NET_BYTES}"
    );
    let initrd = initramfs(art, dir, &body);
    let out = Boot::new(art, &initrd)
        .arg("--net")
        .arg(format!("{NET_TAP},mac=52:54:00:12:34:56,mtu=1400"))
        .run_retrying_early_triple_fault();
    out.expect_ok(&["TCP-SEND-OK", "GUEST-END rc=0"]);
    assert_eq!(value_of(&out.stdout, "MAC"), "52:54:00:12:34:56");
    assert_eq!(value_of(&out.stdout, "MTU"), "1400");
    let want = expected_hash(NET_BYTES);
    assert_eq!(host_echo.join().unwrap(), (NET_BYTES, want));
    assert_eq!(value_of(&out.stdout, "fnv"), format!("{want:016x}"));
}

fn hwrng(art: &Artifacts, dir: &Path) {
    let body = "echo CURRENT=$(cat /sys/class/misc/hw_random/rng_current); \
        dd if=/dev/hwrng of=/tmp/a bs=1024 count=1 2>/dev/null; \
        dd if=/dev/hwrng of=/tmp/b bs=1024 count=1 2>/dev/null; \
        echo SIZE=$(wc -c < /tmp/a); \
        echo SUM_A=$(md5sum /tmp/a | cut -d' ' -f1); echo SUM_B=$(md5sum /tmp/b | cut -d' ' -f1)";
    let initrd = initramfs(art, dir, body);
    let out = Boot::new(art, &initrd)
        .arg("--rng")
        .run_retrying_early_triple_fault();
    out.expect_ok(&["GUEST-END rc=0"]);
    assert!(value_of(&out.stdout, "CURRENT").starts_with("virtio_rng"));
    assert_eq!(value_of(&out.stdout, "SIZE"), "1024");
    assert_ne!(
        value_of(&out.stdout, "SUM_A"),
        value_of(&out.stdout, "SUM_B")
    );
}

fn hostile_scribble(art: &Artifacts, dir: &Path) {
    let (art, dir) = (art.clone(), dir.to_path_buf());
    // In a network namespace of its own for the net device's tap (the VMM creates it).
    in_own_netns(move || hostile_scribble_in_own_netns(&art, &dir));
}

fn hostile_scribble_in_own_netns(art: &Artifacts, dir: &Path) {
    let disk = dir.join("scratch.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let uds = dir.join("v.sock");
    let initrd = initramfs(art, dir, "guest-tool scribble 40");
    let out = Boot::new(art, &initrd)
        .arg("--rng")
        .arg("--disk")
        .arg(&disk)
        .arg("--vsock")
        .arg(format!("3,{}", uds.display()))
        .arg("--net")
        .arg("mvtap1")
        .run_retrying_early_triple_fault();
    // The VMM survived: the guest's reset still ended it cleanly.
    out.expect_ok(&["SCRIBBLE windows=4", "SCRIBBLE-DONE"]);
    assert!(
        out.stderr.contains("virtio"),
        "expected the VMM to log the garbage it refused:\n{}",
        out.stderr
    );
}

/// A minimal ELF "kernel": one segment at 1 MiB holding `ud2`, no PVH note (so it is entered
/// in long mode). With no IDT the #UD escalates to a triple fault.
fn ud2_kernel(path: &Path) {
    let mut elf = vec![0u8; 0x1002];
    elf[..16].copy_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    let put = |elf: &mut Vec<u8>, off: usize, bytes: &[u8]| {
        elf[off..off + bytes.len()].copy_from_slice(bytes)
    };
    put(&mut elf, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut elf, 18, &0x3eu16.to_le_bytes()); // x86-64
    put(&mut elf, 20, &1u32.to_le_bytes());
    put(&mut elf, 24, &0x10_0000u64.to_le_bytes()); // entry
    put(&mut elf, 32, &64u64.to_le_bytes()); // program headers
    put(&mut elf, 52, &64u16.to_le_bytes());
    put(&mut elf, 54, &56u16.to_le_bytes());
    put(&mut elf, 56, &1u16.to_le_bytes());
    let ph = 64;
    put(&mut elf, ph, &1u32.to_le_bytes()); // PT_LOAD
    put(&mut elf, ph + 4, &5u32.to_le_bytes()); // R+X
    put(&mut elf, ph + 8, &0x1000u64.to_le_bytes()); // offset
    put(&mut elf, ph + 16, &0x10_0000u64.to_le_bytes()); // vaddr
    put(&mut elf, ph + 24, &0x10_0000u64.to_le_bytes()); // paddr
    put(&mut elf, ph + 32, &2u64.to_le_bytes()); // filesz
    put(&mut elf, ph + 40, &2u64.to_le_bytes()); // memsz
    put(&mut elf, ph + 48, &0x1000u64.to_le_bytes()); // align
    put(&mut elf, 0x1000, &[0x0f, 0x0b]); // ud2
    std::fs::write(path, elf).unwrap();
}

fn triple_fault(art: &Artifacts, dir: &Path) {
    let kernel = dir.join("ud2.elf");
    ud2_kernel(&kernel);
    let initrd = initramfs(art, dir, "true");
    let out = Boot::with_kernel(art, &kernel, &initrd)
        .timeout(Duration::from_secs(60))
        .run();
    assert_eq!(
        out.code,
        Some(1),
        "stdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("triple-fault"))
        .collect();
    assert_eq!(errors.len(), 1, "one clear line expected:\n{}", out.stderr);
}
