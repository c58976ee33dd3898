//! What happened to a packet: the index of `np_stats`. Every drop has its own reason here, and so
//! does every way a packet can leave untouched, so `nodeport-agent status` can explain traffic.

/// Index into the per-CPU `np_stats` array. Values are stable: they are part of the map layout.
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Counter {
    /// Not IPv4 (ARP, IPv6, ...): passed untouched.
    PassNotIpv4 = 0,
    /// IPv4 but not for a NodePort address/port and not a reply we translate: passed untouched.
    PassNotNodePort = 1,
    /// Headers shorter than they claim, or a bad IHL: passed untouched (the stack decides).
    PassMalformed = 2,
    /// An IP fragment addressed to a node address: ports are unknown (non-first fragments carry
    /// none), so it is never translated; passed to the stack.
    PassFragment = 3,
    /// The programs are loaded but the agent has not written `np_config` yet.
    PassNotConfigured = 4,
    /// TTL would expire on forwarding: handed to the stack, which answers ICMP time exceeded.
    PassTtlExceeded = 5,
    /// The FIB could not resolve the next hop in XDP: handed untranslated to the stack/TC program.
    PassFibMiss = 6,
    /// First packet of a new flow, translated and forwarded.
    NewFlow = 7,
    /// Packet of an established flow, translated and forwarded.
    Established = 8,
    /// Reply from a backend, reverse-translated and forwarded.
    Reply = 9,
    /// A tracked flow's backend was removed: the packet was balanced again as a new flow. A TCP
    /// backend that knows nothing of the connection answers RST, which ends it cleanly for the
    /// client (what kube-proxy's conntrack does too); a UDP flow simply moves.
    Reselected = 10,
    /// Dropped: the service has no ready (or serving) backend. No longer counted by the packet
    /// path, which hands such packets to the node's stack instead (`PassNoBackend`); kept so
    /// the later indices stay where pinned maps have them.
    DropNoBackend = 11,
    /// Dropped: externalTrafficPolicy=Local and this node has no local backend.
    DropNoLocalBackend = 12,
    /// Dropped: no free SNAT port for this backend, or no free port to remap the client's port
    /// of a DNAT-only flow whose tuple towards the pod another live flow holds.
    DropSnatExhausted = 13,
    /// Dropped: a connection-tracking insert failed.
    DropCtInsert = 14,
    /// Dropped: a slot named a backend id that does not exist (the agent is mid-update).
    DropStaleSlot = 15,
    /// Dropped: the packet could not be rewritten (a helper failed).
    DropRewrite = 16,
    /// Dropped: no route to the backend or the client for a source-NATed packet (handing it to
    /// the stack would only see it dropped as a martian: its source is a local address).
    DropNoRoute = 17,
    /// The service has no ready (or serving) backend: handed untouched to the node's stack,
    /// where nothing listens on the nodePort, so the client is refused at once (TCP reset, ICMP
    /// port unreachable for UDP): kube-proxy's REJECT rule for services without endpoints.
    PassNoBackend = 18,
}

impl Counter {
    pub const COUNT: u32 = 19;

    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::PassNotIpv4,
        Counter::PassNotNodePort,
        Counter::PassMalformed,
        Counter::PassFragment,
        Counter::PassNotConfigured,
        Counter::PassTtlExceeded,
        Counter::PassFibMiss,
        Counter::NewFlow,
        Counter::Established,
        Counter::Reply,
        Counter::Reselected,
        Counter::DropNoBackend,
        Counter::DropNoLocalBackend,
        Counter::DropSnatExhausted,
        Counter::DropCtInsert,
        Counter::DropStaleSlot,
        Counter::DropRewrite,
        Counter::DropNoRoute,
        Counter::PassNoBackend,
    ];

    /// Stable snake_case name, used in metrics labels and `nodeport-agent status`.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::PassNotIpv4 => "pass_not_ipv4",
            Counter::PassNotNodePort => "pass_not_nodeport",
            Counter::PassMalformed => "pass_malformed",
            Counter::PassFragment => "pass_fragment",
            Counter::PassNotConfigured => "pass_not_configured",
            Counter::PassTtlExceeded => "pass_ttl_exceeded",
            Counter::PassFibMiss => "pass_fib_miss",
            Counter::NewFlow => "new_flow",
            Counter::Established => "established",
            Counter::Reply => "reply",
            Counter::Reselected => "reselected",
            Counter::DropNoBackend => "drop_no_backend",
            Counter::DropNoLocalBackend => "drop_no_local_backend",
            Counter::DropSnatExhausted => "drop_snat_exhausted",
            Counter::DropCtInsert => "drop_ct_insert",
            Counter::DropStaleSlot => "drop_stale_slot",
            Counter::DropRewrite => "drop_rewrite",
            Counter::DropNoRoute => "drop_no_route",
            Counter::PassNoBackend => "pass_no_backend",
        }
    }

    pub const fn is_drop(self) -> bool {
        let n = self as u32;
        n >= Counter::DropNoBackend as u32 && n <= Counter::DropNoRoute as u32
    }
}

/// What the socket programs did: the index of the per-CPU `np_sk_stats` array (a `u64` count of
/// calls each). Kept apart from `Counter`, which counts packets (each exactly once).
#[repr(u32)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SockCounter {
    /// A connect() or sendmsg() to a node address at a nodePort was sent to a backend instead.
    Translated = 0,
    /// A connect() or sendmsg() to a node address at a nodePort whose service has no usable
    /// backend (none, none on this node under externalTrafficPolicy=Local, mid-update): left
    /// as it was, so the node's own stack refuses it.
    NoBackend = 1,
    /// A getpeername() or recvmsg() showed the node address:nodePort instead of the backend.
    Restored = 2,
    /// The translation could not be remembered (np_sk_nat4 insert failed): the socket still
    /// reaches the backend, but getpeername()/recvmsg() show the backend's address.
    NatInsertFailed = 3,
}

impl SockCounter {
    pub const COUNT: u32 = 4;

    pub const ALL: [SockCounter; Self::COUNT as usize] = [
        SockCounter::Translated,
        SockCounter::NoBackend,
        SockCounter::Restored,
        SockCounter::NatInsertFailed,
    ];

    /// Stable snake_case name, used in metrics labels and `nodeport-agent stats`.
    pub const fn name(self) -> &'static str {
        match self {
            SockCounter::Translated => "sock_translated",
            SockCounter::NoBackend => "sock_no_backend",
            SockCounter::Restored => "sock_restored",
            SockCounter::NatInsertFailed => "sock_nat_insert_failed",
        }
    }
}
