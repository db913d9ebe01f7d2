//! Published ports (`VmConfig::publish`, `Vm::publish`) on a real microVM: TCP on the host,
//! vsock to the agent, TCP to `127.0.0.1:<port>` in the guest. Half-close both ways, teardown
//! from either side, concurrent connections, a port in use, and the listener gone with the VM.
//!
//! The guest servers are busybox `nc -l` (one connection each); the 10-connection HTTP load is
//! in `tests/cli.rs`.

use std::time::{Duration, Instant};

use supermachine::{Error, PortMapping, Vm};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Starts `busybox nc -l -p PORT -e sh -c SCRIPT` in the guest and waits until it listens.
async fn guest_server(vm: &Vm, port: u16, script: &str) -> supermachine::ExecChild {
    supermachine_e2e::start_nc_server(vm.agent(), port, script, Duration::from_secs(120)).await
}

#[test]
fn published_ports_carry_tcp_with_half_close_and_teardown() {
    if !supermachine_e2e::kvm_available_or_skip(
        "published_ports_carry_tcp_with_half_close_and_teardown",
    ) {
        return;
    }
    supermachine_e2e::shared_runtime().block_on(async {
        let config = supermachine_e2e::test_vm_config()
            .expect("config")
            .publish("0:7001".parse().expect("mapping"));
        let vm = Vm::start(config).await.expect("start");
        let ports = vm.published_ports();
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0].guest_port, 7001);
        let host = ports[0].host;
        assert!(host.ip().is_loopback() && host.port() != 0, "{host}");

        // Host half-closes; the guest server reads to EOF and still answers; then it closes
        // and the host reads EOF.
        let mut server = guest_server(&vm, 7001, r#"n=$(wc -c); echo "got $n""#).await;
        let mut tcp = TcpStream::connect(host).await.expect("connect");
        tcp.write_all(&vec![7u8; 5000]).await.expect("write");
        tcp.shutdown().await.expect("shutdown");
        let mut reply = String::new();
        tcp.read_to_string(&mut reply).await.expect("read");
        assert_eq!(reply.trim(), "got 5000");
        assert!(server.wait().await.expect("nc").success());

        // The host closes first: the guest server sees EOF and ends.
        let server = guest_server(&vm, 7001, "cat > /tmp/received").await;
        let mut tcp = TcpStream::connect(host).await.expect("connect");
        tcp.write_all(b"bye").await.expect("write");
        drop(tcp);
        let status = tokio::time::timeout(Duration::from_secs(120), async {
            let mut server = server;
            server.wait().await
        })
        .await
        .expect("the guest server saw the host's close")
        .expect("nc");
        assert!(status.success());
        let received = vm.agent().read_file("/tmp/received").await.expect("read");
        assert_eq!(&received[..], b"bye");

        // A port published while the VM runs; nothing listening there yet → the connection
        // is reset at once rather than left hanging.
        let extra = vm.publish(PortMapping::tcp(0, 7002)).expect("publish");
        assert_eq!(vm.published_ports().len(), 2);
        let mut tcp = TcpStream::connect(extra.host).await.expect("connect");
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(60), tcp.read(&mut buf))
            .await
            .expect("refused promptly");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

        // Concurrent connections: 8 guest servers on 8 ports, all at once.
        let mut servers = Vec::new();
        let mut hosts = Vec::new();
        for i in 0..8u16 {
            let published = vm.publish(PortMapping::tcp(0, 7100 + i)).expect("publish");
            hosts.push(published.host);
            servers.push(guest_server(&vm, 7100 + i, "cat").await);
        }
        let echoes = hosts.into_iter().enumerate().map(|(i, host)| async move {
            let payload: Vec<u8> = (0..20_000u32).map(|b| (b as usize * 7 + i) as u8).collect();
            let mut tcp = TcpStream::connect(host).await.expect("connect");
            let (mut rd, mut wr) = tcp.split();
            let write = async {
                wr.write_all(&payload).await.expect("write");
                wr.shutdown().await.expect("shutdown");
            };
            let mut echoed = Vec::new();
            let read = rd.read_to_end(&mut echoed);
            let (_, read) = tokio::join!(write, read);
            read.expect("read");
            assert_eq!(echoed, payload, "connection {i}");
        });
        futures::future::join_all(echoes).await;
        for mut server in servers {
            assert!(server.wait().await.expect("nc").success());
        }

        // A host address in use fails the start before a VM exists.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let busy = taken.local_addr().expect("addr");
        let config = supermachine_e2e::test_vm_config()
            .expect("config")
            .publish(PortMapping::new(busy, 80));
        match Vm::start(config).await {
            Err(Error::Publish {
                host,
                guest_port,
                source,
            }) => {
                assert_eq!((host, guest_port), (busy, 80));
                assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse);
            }
            other => panic!("expected a publish error, got {other:?}"),
        }

        // Dropping the VM closes its listeners (their tasks end on the runtime right after).
        drop(vm);
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(host).await.is_ok() {
            assert!(Instant::now() < deadline, "the listener outlived the VM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}
