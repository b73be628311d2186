//! Connection lifecycle and limits: timeouts, refusals, ports, the cap, reset, the event loop.

use super::*;

#[test]
fn handshake_timeouts_close_host_streams() {
    let env = env();
    let mem = guest_mem();
    let mut guest = Guest::new(&mem);
    let mut dev = Vsock::new(GUEST_CID, &env.uds).unwrap();
    dev.muxer.connect_timeout = Duration::from_millis(50);
    guest.activate(&mut dev);

    // One client whose guest never answers, one that never sends its line.
    let mut answered_never = host_connect(&env.uds, 1234);
    let mut silent = UnixStream::connect(&env.uds).unwrap();
    guest.provide_rx(4);
    pump(&mut dev);
    let pkts = guest.recv();
    assert_eq!(ops(&pkts), [OP_REQUEST]);
    let local = pkts[0].hdr.src_port;
    assert_eq!(dev.muxer.live(), 2);

    std::thread::sleep(Duration::from_millis(120));
    pump(&mut dev);
    let pkts = guest.recv();
    assert_eq!(ops(&pkts), [OP_RST], "the guest forgets the request");
    assert_eq!((pkts[0].hdr.src_port, pkts[0].hdr.dst_port), (local, 1234));
    assert!(sees_eof(&mut answered_never));
    assert!(sees_eof(&mut silent));
    assert_eq!(dev.muxer.live(), 0);
    assert_eq!(dev.muxer.ready_events(), 0, "timer consumed, not re-armed");
}

#[test]
fn refused_host_connections_are_closed() {
    let env = env();
    let mem = guest_mem();
    let mut guest = Guest::new(&mem);
    let mut dev = Vsock::new(GUEST_CID, &env.uds).unwrap();

    // Before the driver is up: closed at once.
    let mut early = host_connect(&env.uds, 1);
    pump(&mut dev);
    assert!(sees_eof(&mut early));

    guest.activate(&mut dev);
    guest.provide_rx(4);
    // Garbage instead of a CONNECT line.
    let mut garbage = UnixStream::connect(&env.uds).unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    // A port that does not parse.
    let mut bad_port = UnixStream::connect(&env.uds).unwrap();
    bad_port.write_all(b"CONNECT 4294967296\n").unwrap();
    // No newline within the limit.
    let mut overlong = UnixStream::connect(&env.uds).unwrap();
    overlong.write_all(&[b' '; 40]).unwrap();
    pump(&mut dev);
    assert!(sees_eof(&mut garbage));
    assert!(sees_eof(&mut bad_port));
    assert!(sees_eof(&mut overlong));
    assert!(guest.recv().is_empty());

    // Nobody listens in the guest: it answers RST, the host stream is closed.
    let mut host = host_connect(&env.uds, 99);
    pump(&mut dev);
    let pkts = guest.recv();
    assert_eq!(ops(&pkts), [OP_REQUEST]);
    guest.send(ghdr(OP_RST, 99, pkts[0].hdr.src_port), &[]);
    pump(&mut dev);
    assert!(sees_eof(&mut host));
    assert!(guest.recv().is_empty(), "no RST in answer to an RST");
    assert_eq!(dev.muxer.live(), 0);
}

#[test]
fn local_ports_are_distinct_and_increasing() {
    let env = env();
    let mem = guest_mem();
    let mut guest = Guest::new(&mem);
    let mut dev = Vsock::new(GUEST_CID, &env.uds).unwrap();
    guest.activate(&mut dev);
    let (_h1, p1) = establish_host(&mut dev, &mut guest, &env.uds, 1, GUEST_BUF_ALLOC);
    let (_h2, p2) = establish_host(&mut dev, &mut guest, &env.uds, 1, GUEST_BUF_ALLOC);
    assert_eq!(p1, FIRST_LOCAL_PORT);
    assert_eq!(p2, FIRST_LOCAL_PORT + 1);
}

#[test]
fn connection_cap_refuses_with_rst() {
    let env = env();
    let mem = guest_mem();
    let mut guest = Guest::new(&mem);
    let mut dev = Vsock::new(GUEST_CID, &env.uds).unwrap();
    dev.muxer.max_connections = 2;
    guest.activate(&mut dev);
    let listener = host_listener(&env.uds, 6000);
    guest.provide_rx(4);
    for src in 1..=3 {
        guest.send(ghdr(OP_REQUEST, src, 6000), &[]);
    }
    pump(&mut dev);
    assert_eq!(ops(&guest.recv()), [OP_RESPONSE, OP_RESPONSE, OP_RST]);
    assert_eq!(dev.muxer.live(), 2);
    // Host clients beyond the cap are closed too.
    let mut host = host_connect(&env.uds, 1);
    pump(&mut dev);
    assert!(sees_eof(&mut host));
    drop(listener);
}

#[test]
fn device_reset_drops_all_connections() {
    let env = env();
    let mem = guest_mem();
    let mut guest = Guest::new(&mem);
    let mut dev = Vsock::new(GUEST_CID, &env.uds).unwrap();
    guest.activate(&mut dev);
    let listener = host_listener(&env.uds, 5000);
    let mut peer = establish_guest(&mut dev, &mut guest, &listener, 40, 5000);
    let (mut host, _) = establish_host(&mut dev, &mut guest, &env.uds, 1234, GUEST_BUF_ALLOC);
    assert_eq!(dev.muxer.live(), 2);

    dev.reset();
    assert!(!dev.core.is_activated());
    assert_eq!(dev.muxer.live(), 0);
    assert!(sees_eof(&mut peer));
    assert!(sees_eof(&mut host));
    // The processing entry points are harmless while reset.
    pump(&mut dev);
}

#[test]
fn constructor_and_config_space() {
    let env = env();
    // Reserved CIDs.
    for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 32] {
        assert!(matches!(
            Vsock::new(cid, &env.uds),
            Err(VsockError::InvalidCid(c)) if c == cid
        ));
    }
    // A regular file is not replaced.
    std::fs::write(&env.uds, b"precious").unwrap();
    assert!(matches!(
        Vsock::new(GUEST_CID, &env.uds),
        Err(VsockError::NotASocket(_))
    ));
    std::fs::remove_file(&env.uds).unwrap();
    // A stale socket is.
    drop(UnixListener::bind(&env.uds).unwrap());
    assert!(env.uds.exists());
    let dev = Vsock::new(0x1234_5678, &env.uds).unwrap();
    assert_eq!(dev.guest_cid(), 0x1234_5678);
    // Only its owner may connect, whatever the umask.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&env.uds).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    assert_eq!(dev.core.device_type(), 19);
    assert_eq!(dev.core.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(dev.core.avail_features(), VIRTIO_F_VERSION_1);

    let mut b = [0u8; 8];
    dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), 0x1234_5678);
    let mut b = [0u8; 4];
    dev.read_config(4, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0, "upper half");
    dev.read_config(0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x1234_5678, "lower half");
    let mut b = [0u8; 4];
    dev.read_config(6, &mut b);
    assert_eq!(b, [0; 4], "out of range: untouched");
    dev.read_config(u64::MAX, &mut b);

    // Dropping the device removes its socket.
    drop(dev);
    assert!(!env.uds.exists());
}

#[test]
fn event_manager_drives_the_device() {
    fn assert_send<T: Send>() {}
    assert_send::<Vsock>();

    let env = env();
    let mem = guest_mem();
    let mut guest = Guest::new(&mem);
    let mut dev = Vsock::new(GUEST_CID, &env.uds).unwrap();
    // Keep the handshake timer from firing during the test, however slow the machine.
    dev.muxer.connect_timeout = Duration::from_secs(600);
    let irq = guest.activate(&mut dev);
    let dev = Arc::new(Mutex::new(dev));
    let mut em = EventManager::<Subscriber<Vsock>>::new().unwrap();
    em.add_subscriber(Subscriber(dev.clone()));

    let run_until = |em: &mut EventManager<Subscriber<Vsock>>, guest: &Guest<'_>, n: u16| {
        for _ in 0..50 {
            em.run_with_timeout(20).unwrap();
            if guest.rx_used() >= n {
                return;
            }
        }
        panic!("no rx packet");
    };

    guest.provide_rx(8);
    let mut host = host_connect(&env.uds, 77);
    run_until(&mut em, &guest, 1);
    let pkts = guest.recv();
    assert_eq!(ops(&pkts), [OP_REQUEST]);
    assert_eq!(pkts[0].hdr.dst_port, 77);
    assert_ne!(irq.status() & VIRTIO_MMIO_INT_VRING, 0);
    let local = pkts[0].hdr.src_port;

    // The guest answers and notifies the tx queue (the transport's ioeventfd would).
    guest.send(ghdr(OP_RESPONSE, 77, local), &[]);
    dev.lock().unwrap().core.queue_events()[TXQ]
        .write(1)
        .unwrap();
    for _ in 0..5 {
        em.run_with_timeout(20).unwrap();
    }
    assert_eq!(read_line(&mut host), format!("OK {local}\n"));

    host.write_all(b"ping").unwrap();
    run_until(&mut em, &guest, 2);
    assert_eq!(rw_payload(&guest.recv(), local, 77), b"ping");

    // Nothing left to do: the loop sleeps (no busy polling).
    assert_eq!(em.run_with_timeout(50).unwrap(), 0);
}

#[test]
fn paused_stream_that_hangs_up_does_not_wake_the_loop() {
    let env = env();
    let mem = guest_mem();
    let mut guest = Guest::new(&mem);
    let mut dev = Vsock::new(GUEST_CID, &env.uds).unwrap();
    guest.activate(&mut dev);
    let (mut host, local) = establish_host(&mut dev, &mut guest, &env.uds, 1234, 1000);

    // The host writes more than the guest's credit and hangs up. A paused stream left in the
    // epoll set with an empty mask would still report EPOLLHUP on every wait.
    let data = pattern(2500, 9);
    host.write_all(&data).unwrap();
    drop(host);
    guest.provide_rx(8);
    pump(&mut dev);
    let mut got = rw_payload(&guest.recv(), local, 1234);
    assert_eq!(got.len(), 1000);
    assert_eq!(dev.muxer.ready_events(), 0);

    // Credit comes back: the rest of the data, then SHUTDOWN(SEND); nothing is lost.
    let mut pkts = Vec::new();
    for fwd in [1000, 2000] {
        let mut credit = ghdr(OP_CREDIT_UPDATE, 1234, local);
        credit.buf_alloc = 1000;
        credit.fwd_cnt = fwd;
        guest.send(credit, &[]);
        pump(&mut dev);
        pkts.extend(guest.recv());
    }
    got.extend(rw_payload(&pkts, local, 1234));
    assert_eq!(ops(&pkts), [OP_RW, OP_RW, OP_SHUTDOWN]);
    assert_eq!(got, data);
}

#[test]
fn backed_up_control_queue_stalls_the_tx_queue() {
    let env = env();
    let mem = guest_mem();
    let mut guest = Guest::new(&mem);
    let mut dev = Vsock::new(GUEST_CID, &env.uds).unwrap();
    guest.activate(&mut dev);

    // A guest that sends to unknown connections without offering rx buffers piles up RSTs.
    let mut port = 0;
    let mut send_batch = |guest: &mut Guest<'_>, n: u32| {
        for _ in 0..n {
            port += 1;
            guest.send(ghdr(OP_RW, port, 9999), &[]);
        }
    };
    for _ in 0..10 {
        send_batch(&mut guest, 200);
        dev.process_tx();
    }
    assert_eq!(guest.tx_used(), 2000);
    send_batch(&mut guest, 200);
    dev.process_tx();
    // The queue holds CTL_CAPACITY / 2 = 2048 packets; then the tx queue is left alone.
    assert_eq!(guest.tx_used(), 2048);
    assert!(dev.muxer.ctl_backlogged());

    // The guest takes 100 (the harness's descriptor table holds ~140 rx buffers at a time):
    // the tx queue is served again, up to the limit.
    let mut ports = Vec::new();
    guest.provide_rx(100);
    dev.process_rx();
    ports.extend(guest.recv().iter().map(|p| p.hdr.dst_port));
    assert_eq!(guest.tx_used(), 2148);
    assert!(dev.muxer.ctl_backlogged());
    guest.provide_rx(100);
    dev.process_rx();
    ports.extend(guest.recv().iter().map(|p| p.hdr.dst_port));
    assert_eq!(guest.tx_used(), 2200, "all tx buffers returned");
    assert!(!dev.muxer.ctl_backlogged());
    // Drain the rest: every RST arrives, in order.
    for _ in 0..20 {
        guest.provide_rx(100);
        dev.process_rx();
        ports.extend(guest.recv().iter().map(|p| p.hdr.dst_port));
    }
    assert!(
        ports.iter().copied().eq(1..=2200),
        "{} RSTs, first {:?}",
        ports.len(),
        &ports[..ports.len().min(8)]
    );
}
