//! Connections carrying data: handshakes both ways, shutdown, credit, malformed packets.

use super::*;

#[test]
fn host_initiated_connection_end_to_end() {
    let env = env();
    let mem = guest_mem();
    let mut guest = Guest::new(&mem);
    let mut dev = Vsock::new(GUEST_CID, &env.uds).unwrap();
    let irq = guest.activate(&mut dev);

    // The host asks for guest port 1234; the line arrives in two pieces.
    let mut host = UnixStream::connect(&env.uds).unwrap();
    host.set_read_timeout(Some(TIMEOUT)).unwrap();
    host.write_all(b"CONN").unwrap();
    guest.provide_rx(16);
    pump(&mut dev);
    assert!(
        guest.recv().is_empty(),
        "nothing before the line is complete"
    );
    host.write_all(b"ECT 1234\n").unwrap();
    pump(&mut dev);
    let pkts = guest.recv();
    assert_eq!(ops(&pkts), [OP_REQUEST]);
    let req = pkts[0].hdr;
    assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!(req.dst_port, 1234);
    assert!(req.src_port >= FIRST_LOCAL_PORT);
    assert_eq!(req.type_, TYPE_STREAM);
    assert_eq!(req.buf_alloc, BUF_ALLOC);
    assert_ne!(irq.status() & VIRTIO_MMIO_INT_VRING, 0, "guest interrupted");
    let local = req.src_port;

    // The guest accepts; the host learns the local port.
    guest.send(ghdr(OP_RESPONSE, 1234, local), &[]);
    pump(&mut dev);
    assert_eq!(read_line(&mut host), format!("OK {local}\n"));

    // Host -> guest: 5000 bytes span two 4 KiB rx buffers.
    let h2g = pattern(5000, 1);
    host.write_all(&h2g).unwrap();
    pump(&mut dev);
    let pkts = guest.recv();
    assert!(pkts.len() >= 2);
    assert_eq!(rw_payload(&pkts, local, 1234), h2g);
    assert!(pkts.iter().all(|p| p.hdr.buf_alloc == BUF_ALLOC));

    // Guest -> host, in two packets.
    let g2h = pattern(6000, 2);
    guest.send(rw(1234, local, 3500), &g2h[..3500]);
    guest.send(rw(1234, local, 2500), &g2h[3500..]);
    pump(&mut dev);
    let mut got = vec![0u8; g2h.len()];
    host.read_exact(&mut got).unwrap();
    assert_eq!(got, g2h);

    // The host closes its sending side: the guest sees SHUTDOWN(SEND).
    host.shutdown(std::net::Shutdown::Write).unwrap();
    pump(&mut dev);
    let pkts = guest.recv();
    assert_eq!(ops(&pkts), [OP_SHUTDOWN]);
    assert_ne!(pkts[0].hdr.flags & SHUTDOWN_SEND, 0);

    // The guest closes: both directions are done, the device answers RST and drops it.
    let mut shut = ghdr(OP_SHUTDOWN, 1234, local);
    shut.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    guest.send(shut, &[]);
    pump(&mut dev);
    assert_eq!(ops(&guest.recv()), [OP_RST]);
    assert!(sees_eof(&mut host));
    assert_eq!(dev.muxer.live(), 0);
    assert_eq!(guest.tx_used(), guest.tx_sent, "every tx buffer returned");
}

#[test]
fn guest_initiated_connection_and_refusal() {
    let env = env();
    let mem = guest_mem();
    let mut guest = Guest::new(&mem);
    let mut dev = Vsock::new(GUEST_CID, &env.uds).unwrap();
    guest.activate(&mut dev);

    let listener = host_listener(&env.uds, 5000);
    let mut peer = establish_guest(&mut dev, &mut guest, &listener, 40, 5000);

    // Data both ways.
    let g2h = pattern(3000, 3);
    guest.send(rw(40, 5000, g2h.len()), &g2h);
    pump(&mut dev);
    let mut got = vec![0u8; g2h.len()];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(got, g2h);
    let h2g = pattern(2000, 4);
    peer.write_all(&h2g).unwrap();
    guest.provide_rx(4);
    pump(&mut dev);
    assert_eq!(rw_payload(&guest.recv(), 5000, 40), h2g);

    // Nobody listens on port 5001: RST.
    guest.provide_rx(1);
    guest.send(ghdr(OP_REQUEST, 41, 5001), &[]);
    pump(&mut dev);
    let pkts = guest.recv();
    assert_eq!(ops(&pkts), [OP_RST]);
    assert_eq!((pkts[0].hdr.src_port, pkts[0].hdr.dst_port), (5001, 41));
    assert_eq!(dev.muxer.live(), 1);
}

#[test]
fn guest_shutdown_flushes_then_closes_host_write_side() {
    let env = env();
    let mem = guest_mem();
    let mut guest = Guest::new(&mem);
    let mut dev = Vsock::new(GUEST_CID, &env.uds).unwrap();
    guest.activate(&mut dev);
    let listener = host_listener(&env.uds, 7000);
    let mut peer = establish_guest(&mut dev, &mut guest, &listener, 50, 7000);

    let data = pattern(1000, 5);
    guest.send(rw(50, 7000, data.len()), &data);
    let mut shut = ghdr(OP_SHUTDOWN, 50, 7000);
    shut.flags = SHUTDOWN_SEND;
    guest.send(shut, &[]);
    pump(&mut dev);
    let mut got = Vec::new();
    peer.read_to_end(&mut got).unwrap();
    assert_eq!(got, data, "data, then EOF");

    // The host may still send; when it closes, the connection is finished.
    guest.provide_rx(4);
    peer.write_all(b"bye").unwrap();
    drop(peer);
    pump(&mut dev);
    let pkts = guest.recv();
    assert_eq!(ops(&pkts), [OP_RW, OP_SHUTDOWN, OP_RST]);
    assert_eq!(pkts[0].data, b"bye");
    assert_eq!(dev.muxer.live(), 0);
}

#[test]
fn malformed_packets_are_dropped_or_reset() {
    let env = env();
    let mem = guest_mem();
    let mut guest = Guest::new(&mem);
    let mut dev = Vsock::new(GUEST_CID, &env.uds).unwrap();
    guest.activate(&mut dev);
    let listener = host_listener(&env.uds, 5000);
    let mut peer = establish_guest(&mut dev, &mut guest, &listener, 40, 5000);
    guest.provide_rx(32);

    // Foreign source CID, no connection: dropped silently.
    let mut h = ghdr(OP_REQUEST, 41, 5000);
    h.src_cid = 99;
    guest.send(h, &[]);
    // Unknown op: RST.
    guest.send(ghdr(99, 42, 5000), &[]);
    // Unsupported type (SEQPACKET): RST.
    let mut h = ghdr(OP_REQUEST, 43, 5000);
    h.type_ = 2;
    guest.send(h, &[]);
    // Destination other than the host: RST.
    let mut h = ghdr(OP_REQUEST, 45, 5000);
    h.dst_cid = 7;
    guest.send(h, &[]);
    // Header descriptor too short to hold a header: dropped.
    let a = guest.tx_alloc(16);
    guest.send_raw(&[(a, 10, false)]);
    // Device-writable tx header: dropped.
    let a = guest.tx_header(ghdr(OP_REQUEST, 47, 5000));
    guest.send_raw(&[(a, HDR_SIZE as u32, true)]);
    // Header outside guest memory: dropped.
    guest.send_raw(&[(MEM_SIZE as u64 - 8, HDR_SIZE as u32, false)]);
    // Length the descriptors cannot hold, unknown connection: RST.
    let a = guest.tx_header(rw(44, 5000, 1000));
    let d = guest.tx_alloc(16);
    guest.send_raw(&[(a, HDR_SIZE as u32, false), (d, 16, false)]);
    // Data for an unknown connection: RST; RST for an unknown connection: nothing.
    guest.send(rw(46, 5000, 3), b"abc");
    guest.send(ghdr(OP_RST, 48, 5000), &[]);
    pump(&mut dev);
    assert_eq!(guest.tx_used(), guest.tx_sent, "every tx buffer returned");
    let pkts = guest.recv();
    assert!(pkts.iter().all(|p| p.hdr.op == OP_RST), "{pkts:?}");
    let mut reset: Vec<u32> = pkts.iter().map(|p| p.hdr.dst_port).collect();
    reset.sort_unstable();
    assert_eq!(reset, [42, 43, 44, 45, 46]);
    assert_eq!(dev.muxer.live(), 1, "the good connection survived");

    // A huge length on the live connection resets it.
    let a = guest.tx_header(rw(40, 5000, 100_000));
    let d = guest.tx_alloc(16);
    guest.send_raw(&[(a, HDR_SIZE as u32, false), (d, 16, false)]);
    pump(&mut dev);
    let pkts = guest.recv();
    assert_eq!(ops(&pkts), [OP_RST]);
    assert_eq!(pkts[0].hdr.dst_port, 40);
    assert!(sees_eof(&mut peer));
    // So does a protocol violation (a second REQUEST) on another one.
    let mut peer2 = establish_guest(&mut dev, &mut guest, &listener, 60, 5000);
    guest.send(ghdr(OP_REQUEST, 60, 5000), &[]);
    guest.provide_rx(4);
    pump(&mut dev);
    let pkts = guest.recv();
    assert_eq!(ops(&pkts), [OP_RST]);
    assert_eq!(pkts[0].hdr.dst_port, 60);
    assert!(sees_eof(&mut peer2));
    assert_eq!(dev.muxer.live(), 0);
}

#[test]
fn host_to_guest_respects_credit_and_stops_watching() {
    let env = env();
    let mem = guest_mem();
    let mut guest = Guest::new(&mem);
    let mut dev = Vsock::new(GUEST_CID, &env.uds).unwrap();
    guest.activate(&mut dev);
    let (mut host, local) = establish_host(&mut dev, &mut guest, &env.uds, 1234, 4096);

    let data = pattern(10_000, 6);
    host.write_all(&data).unwrap();
    guest.provide_rx(8);
    pump(&mut dev);
    let first = rw_payload(&guest.recv(), local, 1234);
    assert_eq!(first.len(), 4096, "exactly the guest's credit");
    // Out of credit: the stream is out of the epoll set although data waits, so the event
    // loop is not woken for it (no busy polling).
    assert_eq!(
        dev.muxer.conn_interest(local, 1234),
        Some(EventSet::empty())
    );
    assert_eq!(dev.muxer.ready_events(), 0);

    // The guest consumed it and says so.
    let mut credit = ghdr(OP_CREDIT_UPDATE, 1234, local);
    credit.buf_alloc = 4096;
    credit.fwd_cnt = 4096;
    guest.send(credit, &[]);
    pump(&mut dev);
    let second = rw_payload(&guest.recv(), local, 1234);
    assert_eq!(second.len(), 4096);

    // Any header carries credit, e.g. data the guest sends.
    let mut h = rw(1234, local, 2);
    h.buf_alloc = 4096;
    h.fwd_cnt = 8192;
    guest.send(h, b"hi");
    pump(&mut dev);
    let third = rw_payload(&guest.recv(), local, 1234);
    assert_eq!([first, second, third].concat(), data);
    let mut hi = [0u8; 2];
    host.read_exact(&mut hi).unwrap();
    assert_eq!(&hi, b"hi");
}

#[test]
fn missing_rx_buffers_pause_the_stream_until_the_guest_adds_some() {
    let env = env();
    let mem = guest_mem();
    let mut guest = Guest::new(&mem);
    let mut dev = Vsock::new(GUEST_CID, &env.uds).unwrap();
    guest.activate(&mut dev);
    // establish_host offers exactly one rx buffer, used by the REQUEST.
    let (mut host, local) = establish_host(&mut dev, &mut guest, &env.uds, 1234, GUEST_BUF_ALLOC);

    host.write_all(b"hello").unwrap();
    pump(&mut dev);
    assert!(guest.recv().is_empty());
    assert_eq!(
        dev.muxer.conn_interest(local, 1234),
        Some(EventSet::empty())
    );
    assert_eq!(
        dev.muxer.ready_events(),
        0,
        "nothing to wake the event loop"
    );

    guest.provide_rx(2);
    dev.process_rx(); // the rx queue notification
    pump(&mut dev);
    assert_eq!(rw_payload(&guest.recv(), local, 1234), b"hello");
    assert_eq!(
        dev.muxer.conn_interest(local, 1234),
        Some(EventSet::IN),
        "watching again"
    );
}

#[test]
fn credit_updates_after_forwarding_and_on_request() {
    let env = env();
    let mem = guest_mem();
    let mut guest = Guest::new(&mem);
    let mut dev = Vsock::new(GUEST_CID, &env.uds).unwrap();
    guest.activate(&mut dev);
    let listener = host_listener(&env.uds, 5000);
    let mut peer = establish_guest(&mut dev, &mut guest, &listener, 40, 5000);
    peer.set_nonblocking(true).unwrap();
    guest.provide_rx(8);

    // Three 64 KiB packets, within the 256 KiB credit.
    let data = pattern(3 * 65536, 7);
    for chunk in data.chunks(65536) {
        guest.send(rw(40, 5000, chunk.len()), chunk);
    }
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    for _ in 0..1000 {
        pump(&mut dev);
        match peer.read(&mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        if got.len() == data.len() {
            break;
        }
    }
    assert_eq!(got, data);
    pump(&mut dev);
    let pkts = guest.recv();
    let updates: Vec<u32> = pkts
        .iter()
        .filter(|p| p.hdr.op == OP_CREDIT_UPDATE)
        .map(|p| p.hdr.fwd_cnt)
        .collect();
    assert!(!updates.is_empty(), "{pkts:?}");
    assert!(updates[0] >= BUF_ALLOC / 2);

    // Asked explicitly, the device tells the exact count.
    guest.send(ghdr(OP_CREDIT_REQUEST, 40, 5000), &[]);
    pump(&mut dev);
    let pkts = guest.recv();
    assert_eq!(ops(&pkts), [OP_CREDIT_UPDATE]);
    assert_eq!(pkts[0].hdr.fwd_cnt, data.len() as u32);
    assert_eq!(pkts[0].hdr.buf_alloc, BUF_ALLOC);
}

#[test]
fn guest_exceeding_credit_is_reset() {
    let env = env();
    let mem = guest_mem();
    let mut guest = Guest::new(&mem);
    let mut dev = Vsock::new(GUEST_CID, &env.uds).unwrap();
    guest.activate(&mut dev);
    let listener = host_listener(&env.uds, 5000);
    // The host never reads.
    let _peer = establish_guest(&mut dev, &mut guest, &listener, 40, 5000);
    guest.provide_rx(8);

    let chunk = pattern(65536, 8);
    for _ in 0..16 {
        guest.send(rw(40, 5000, chunk.len()), &chunk);
    }
    pump(&mut dev);
    let pkts = guest.recv();
    assert!(ops(&pkts).contains(&OP_RST), "{:?}", ops(&pkts));
    assert_eq!(dev.muxer.live(), 0);
    assert_eq!(guest.tx_used(), guest.tx_sent);
}
