//! The dnstap query log (`--dnstap`): each redirected query and the answer its client got,
//! with the client, the server it asked, the times and the workload that asked. Logging never
//! waits: the sink drops and counts what it cannot take ([`crate::dnstap`]).
use std::{
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::SystemTime,
};

use crate::{
    dnstap::{
        DnstapCounters, DnstapError, DnstapSettings, DnstapSink, Event, MessageType, Transport,
        Workload,
    },
    workload::WorkloadNames,
};

/// The log, shared by every listener. Its sink starts once the agent serves without
/// capabilities (its writer thread would keep them); until then nothing is logged, and what would have been is counted as dropped.
pub struct QueryLog {
    sink: OnceLock<DnstapSink>,
    workloads: Arc<WorkloadNames>,
    /// The sink's counters, from the start: an event before the sink starts is dropped, and
    /// counted.
    counters: Arc<DnstapCounters>,
}

impl std::fmt::Debug for QueryLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryLog")
            .field("started", &self.sink.get().is_some())
            .finish_non_exhaustive()
    }
}

/// Which query an event is about.
#[derive(Debug, Clone, Copy)]
pub struct Asked {
    pub transport: Transport,
    pub client: SocketAddr,
    /// The server the client asked.
    pub server: SocketAddr,
    /// The cgroup that asked (0: not recorded).
    pub cgroup: u64,
}

impl QueryLog {
    pub fn new(workloads: Arc<WorkloadNames>) -> Self {
        Self {
            sink: OnceLock::new(),
            workloads,
            counters: Arc::default(),
        }
    }

    /// Starts the sink (its file or socket, and its writer thread), which names workloads
    /// on its own thread.
    pub fn start(&self, mut settings: DnstapSettings) -> Result<(), DnstapError> {
        let workloads = Arc::clone(&self.workloads);
        settings.name_cgroup = Some(Arc::new(move |cgroup| workloads.full_or_id(cgroup)));
        settings.counters = Arc::clone(&self.counters);
        let sink = DnstapSink::start(settings)?;
        let _ = self.sink.set(sink);
        Ok(())
    }

    /// Starts the log file anew at its path (log rotation): whether there is a file log.
    pub fn reopen(&self) -> bool {
        self.sink.get().is_some_and(DnstapSink::reopen)
    }

    /// The log's counters (the sink's, and the events before it started).
    pub fn counters(&self) -> Arc<DnstapCounters> {
        Arc::clone(&self.counters)
    }

    /// The sink, or `None` after counting the event it would have logged as dropped.
    fn sink(&self) -> Option<&DnstapSink> {
        let sink = self.sink.get();
        if sink.is_none() {
            self.counters.drop_one();
        }
        sink
    }

    /// A client's query, as it arrived at `at`.
    pub fn query(&self, asked: Asked, query: &[u8], at: SystemTime) {
        let Some(sink) = self.sink() else {
            return;
        };
        sink.log(&Event {
            kind: MessageType::ClientQuery,
            transport: asked.transport,
            client: asked.client,
            server: asked.server,
            query_time: at,
            query: Some(query),
            response_time: None,
            response: None,
            workload: Workload::Cgroup(asked.cgroup),
        });
    }

    /// The answer a client got at `now`, to its query that arrived at `query_time`.
    pub fn response(&self, asked: Asked, query_time: SystemTime, now: SystemTime, response: &[u8]) {
        let Some(sink) = self.sink() else {
            return;
        };
        sink.log(&Event {
            kind: MessageType::ClientResponse,
            transport: asked.transport,
            client: asked.client,
            server: asked.server,
            query_time,
            query: None,
            response_time: Some(now),
            response: Some(response),
            workload: Workload::Cgroup(asked.cgroup),
        });
    }
}
