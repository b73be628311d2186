//! One typed async method per agent RPC.

use std::time::Duration;

use agent_protocol::agent as pb;
use agent_protocol::stdio::{Header, Stream};
use agent_protocol::ttrpc::context;

use crate::process::{check_id, process_ref, wait_rpc};
use crate::{
    io, ContainerConfig, Error, Exit, Mount, Process, ProcessIo, Result, RootfsSource, Sandbox,
    SandboxSettings, WindowSize,
};

impl Sandbox {
    pub async fn version(&self) -> Result<pb::VersionResponse> {
        self.client
            .version(self.ctx(), &pb::VersionRequest::new())
            .await
            .map_err(|e| Error::rpc("Version", e))
    }

    /// The guest's uptime, once the agent answers.
    pub async fn health(&self) -> Result<Duration> {
        let r = self
            .client
            .health(self.ctx(), &pb::HealthRequest::new())
            .await
            .map_err(|e| Error::rpc("Health", e))?;
        Ok(Duration::from_millis(r.uptime_ms))
    }

    pub async fn create_sandbox(&self, s: &SandboxSettings) -> Result<()> {
        let req = pb::CreateSandboxRequest {
            hostname: s.hostname.clone(),
            dns_servers: s.dns_servers.clone(),
            dns_search: s.dns_search.clone(),
            dns_options: s.dns_options.clone(),
            sysctls: s.sysctls.clone().into_iter().collect(),
            mounts: s.mounts.iter().map(Mount::to_pb).collect(),
            share_pid_namespace: s.share_pid_namespace,
            share_ipc_namespace: s.share_ipc_namespace,
            hosts: s.hosts.clone(),
            ..Default::default()
        };
        self.client
            .create_sandbox(self.ctx(), &req)
            .await
            .map_err(|e| Error::rpc("CreateSandbox", e))?;
        Ok(())
    }

    pub async fn create_container(&self, c: &ContainerConfig) -> Result<()> {
        check_id(&c.id)?;
        let mut rootfs = pb::Rootfs {
            writable: c.rootfs.writable,
            ..Default::default()
        };
        match &c.rootfs.source {
            RootfsSource::Block {
                path,
                fstype,
                options,
            } => rootfs.set_block(pb::BlockDeviceRootfs {
                path: path.clone(),
                fstype: fstype.clone(),
                options: options.clone(),
                ..Default::default()
            }),
            RootfsSource::Directory(d) => rootfs.set_directory(d.clone()),
        }
        let req = pb::CreateContainerRequest {
            id: c.id.clone(),
            spec_json: c.spec_json.clone(),
            rootfs: protobuf::MessageField::some(rootfs),
            mounts: c.mounts.iter().map(Mount::to_pb).collect(),
            ..Default::default()
        };
        self.client
            .create_container(self.ctx(), &req)
            .await
            .map_err(|e| Error::rpc("CreateContainer", e))?;
        Ok(())
    }

    /// Attaches the stdio streams of a process that is about to start; returns the stdio
    /// message for the start request and the copy threads.
    async fn attach(
        &self,
        container_id: &str,
        exec_id: &str,
        io: ProcessIo,
    ) -> Result<(
        pb::Stdio,
        Vec<std::thread::JoinHandle<std::io::Result<u64>>>,
    )> {
        if io.terminal.is_some() && io.stderr.is_some() {
            return Err(Error::Invalid(
                "a terminal has no separate stderr: give stdout only".into(),
            ));
        }
        let mut stdio = pb::Stdio {
            stdin: io.stdin.is_some(),
            stdout: io.stdout.is_some(),
            stderr: io.stderr.is_some(),
            terminal: io.terminal.is_some(),
            ..Default::default()
        };
        if let Some(ws) = io.terminal {
            stdio.rows = ws.rows.into();
            stdio.cols = ws.cols.into();
        }
        let mut outputs = Vec::new();
        let mut streams = Vec::new();
        for (fd, which) in [
            (io.stdin, Stream::Stdin),
            (io.stdout, Stream::Stdout),
            (io.stderr, Stream::Stderr),
        ] {
            if let Some(fd) = fd {
                let header = Header::new(which, container_id, exec_id);
                let s = io::open_stream(&self.vmm.uds, &header).await?;
                streams.push((fd, which, s));
            }
        }
        // Threads start only once every stream is open, so a failure leaves nothing running.
        for (fd, which, s) in streams {
            let spawned = match which {
                Stream::Stdin => io::spawn_input(fd, s).map(|_| None),
                _ => io::spawn_output(s, fd, which).map(Some),
            }
            .map_err(|e| Error::io("start a stdio thread", e))?;
            outputs.extend(spawned);
        }
        Ok((stdio, outputs))
    }

    /// Runs the container's init process with `io` attached.
    pub async fn start_container(&self, id: &str, io: ProcessIo) -> Result<Process> {
        check_id(id)?;
        let (stdio, outputs) = self.attach(id, "", io).await?;
        let req = pb::StartContainerRequest {
            id: id.into(),
            stdio: protobuf::MessageField::some(stdio),
            ..Default::default()
        };
        let r = self
            .client
            .start_container(self.ctx(), &req)
            .await
            .map_err(|e| Error::rpc("StartContainer", e))?;
        Ok(Process {
            container_id: id.into(),
            exec_id: String::new(),
            pid: r.pid,
            client: self.client.clone(),
            outputs,
        })
    }

    /// Runs another process (an OCI `process` object as JSON) in a running container.
    pub async fn exec(
        &self,
        container_id: &str,
        exec_id: &str,
        process_json: &[u8],
        io: ProcessIo,
    ) -> Result<Process> {
        check_id(container_id)?;
        check_id(exec_id)?;
        let (stdio, outputs) = self.attach(container_id, exec_id, io).await?;
        let req = pb::ExecProcessRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            process_json: process_json.to_vec(),
            stdio: protobuf::MessageField::some(stdio),
            ..Default::default()
        };
        let r = self
            .client
            .exec_process(self.ctx(), &req)
            .await
            .map_err(|e| Error::rpc("ExecProcess", e))?;
        Ok(Process {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            pid: r.pid,
            client: self.client.clone(),
            outputs,
        })
    }

    /// Sends `signal` to one process ("" = init), or with `all` to every process of the
    /// container.
    pub async fn signal(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: i32,
        all: bool,
    ) -> Result<()> {
        let req = pb::SignalProcessRequest {
            process: process_ref(container_id, exec_id),
            signal: signal as u32,
            all,
            ..Default::default()
        };
        self.client
            .signal_process(self.ctx(), &req)
            .await
            .map_err(|e| Error::rpc("SignalProcess", e))?;
        Ok(())
    }

    /// Waits for a process's exit (the raw RPC; [`Process::wait`] also waits for the host side
    /// of its output).
    pub async fn wait(&self, container_id: &str, exec_id: &str) -> Result<Exit> {
        wait_rpc(&self.client, container_id, exec_id).await
    }

    pub async fn resize_pty(
        &self,
        container_id: &str,
        exec_id: &str,
        ws: WindowSize,
    ) -> Result<()> {
        let req = pb::ResizePtyRequest {
            process: process_ref(container_id, exec_id),
            rows: ws.rows.into(),
            cols: ws.cols.into(),
            ..Default::default()
        };
        self.client
            .resize_pty(self.ctx(), &req)
            .await
            .map_err(|e| Error::rpc("ResizePty", e))?;
        Ok(())
    }

    pub async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<()> {
        let req = pb::CloseStdinRequest {
            process: process_ref(container_id, exec_id),
            ..Default::default()
        };
        self.client
            .close_stdin(self.ctx(), &req)
            .await
            .map_err(|e| Error::rpc("CloseStdin", e))?;
        Ok(())
    }

    /// Guest pids of the container's processes.
    pub async fn list_processes(&self, container_id: &str) -> Result<Vec<u32>> {
        let req = pb::ListProcessesRequest {
            container_id: container_id.into(),
            ..Default::default()
        };
        let r = self
            .client
            .list_processes(self.ctx(), &req)
            .await
            .map_err(|e| Error::rpc("ListProcesses", e))?;
        Ok(r.pids)
    }

    pub async fn stats(&self, container_id: &str) -> Result<pb::StatsResponse> {
        let req = pb::StatsRequest {
            container_id: container_id.into(),
            ..Default::default()
        };
        self.client
            .stats(self.ctx(), &req)
            .await
            .map_err(|e| Error::rpc("Stats", e))
    }

    /// Changes a container's cgroup resources: `resources_json` is an OCI runtime-spec
    /// `linux.resources` object (`LinuxResources`) as JSON; only the fields it has change.
    pub async fn update_container(&self, container_id: &str, resources_json: &[u8]) -> Result<()> {
        let req = pb::UpdateContainerRequest {
            container_id: container_id.into(),
            resources_json: resources_json.to_vec(),
            ..Default::default()
        };
        self.client
            .update_container(self.ctx(), &req)
            .await
            .map_err(|e| Error::rpc("UpdateContainer", e))?;
        Ok(())
    }

    /// Configures the guest's network interfaces (found by MAC), routes and neighbours, for
    /// example from `hostnet::PodInterface::agent_request`.
    pub async fn configure_network(&self, req: &pb::ConfigureNetworkRequest) -> Result<()> {
        self.client
            .configure_network(self.ctx(), req)
            .await
            .map_err(|e| Error::rpc("ConfigureNetwork", e))?;
        Ok(())
    }

    /// Waits for the next out-of-memory kill in any container.
    pub async fn next_oom_event(&self) -> Result<pb::OomEvent> {
        self.client
            .get_oom_event(context::with_timeout(0), &pb::GetOomEventRequest::new())
            .await
            .map_err(|e| Error::rpc("GetOomEvent", e))
    }

    pub async fn remove_container(&self, id: &str) -> Result<()> {
        let req = pb::RemoveContainerRequest {
            id: id.into(),
            ..Default::default()
        };
        self.client
            .remove_container(self.ctx(), &req)
            .await
            .map_err(|e| Error::rpc("RemoveContainer", e))?;
        Ok(())
    }
}
