//! kube-proxy's chain names: a sha256 of the service port (and endpoint), base32 (RFC 4648,
//! standard alphabet, Go's `base32.StdEncoding`), truncated.
use data_encoding::BASE32;
use sha2::{Digest as _, Sha256};

use super::model::{Endpoint, ServicePort};

fn base32_sha256(input: &str) -> String {
    BASE32.encode(&Sha256::digest(input.as_bytes()))
}

/// iptables `portProtoHash`: the first 16 characters of base32(sha256(name + protocol)), where
/// name is `ns/svc:port` (pkg/proxy/iptables/proxier.go). Chain names must fit iptables' 28
/// characters.
pub fn port_proto_hash(sp: &ServicePort) -> String {
    base32_sha256(&format!("{}{}", sp.name_string(), sp.proto.lower()))[..16].to_owned()
}

/// iptables `servicePortEndpointChainName`: `KUBE-SEP-` and the first 16 characters of
/// base32(sha256(name + protocol + ip:port)).
pub fn iptables_endpoint_chain(sp: &ServicePort, ep: &Endpoint) -> String {
    let input = format!("{}{}{}", sp.name_string(), sp.proto.lower(), ep.addr());
    format!("KUBE-SEP-{}", &base32_sha256(&input)[..16])
}

/// nftables `hashAndTruncate` (pkg/proxy/nftables/proxier.go): the first 8 characters of
/// base32(sha256(name)), `-`, name; cut to 240 characters (nft's 256 less the longest prefix)
/// ending in `...`.
fn hash_and_truncate(name: &str) -> String {
    const BASE_LENGTH_MAX: usize = 256 - 16;
    let mut out = format!("{}-{name}", &base32_sha256(name)[..8]);
    if out.len() > BASE_LENGTH_MAX {
        out.truncate(BASE_LENGTH_MAX - 3);
        out.push_str("...");
    }
    out
}

/// nftables `servicePortChainNameBase`: `HASH-ns/svc/proto/port`.
pub fn nft_service_base(sp: &ServicePort) -> String {
    hash_and_truncate(&format!(
        "{}/{}/{}/{}",
        sp.namespace,
        sp.name,
        sp.proto.lower(),
        sp.port_name
    ))
}

/// nftables `servicePortEndpointChainNameBase`: `HASH-ns/svc/proto/port__ip/port`.
pub fn nft_endpoint_base(sp: &ServicePort, ep: &Endpoint) -> String {
    hash_and_truncate(&format!(
        "{}/{}/{}/{}__{}/{}",
        sp.namespace,
        sp.name,
        sp.proto.lower(),
        sp.port_name,
        ep.ip,
        ep.port
    ))
}
