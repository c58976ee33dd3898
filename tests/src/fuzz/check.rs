//! Does what a program did match one of the outcomes the model allows? Translated packets are
//! compared byte by byte with the input plus exactly the changes the model names; the two
//! checksum fields are checked from scratch (RFC 1071 over the whole header and the pseudo
//! header, `packet::checksum`), never by redoing the program's incremental update.
use std::net::Ipv4Addr;

use crate::packet::{self, UDP};

use super::model::{Hook, Model, Outcome, Prediction, Rewrite, View, verdict_name};

/// Must equal `nodeport-ebpf/src/xdp.rs`'s JUDGED_MARK ("NPJD"), in XDP metadata.
pub const JUDGED_MARK: u32 = 0x4e50_4a44;

/// What one BPF_PROG_TEST_RUN call gave back.
#[derive(Clone, Debug)]
pub struct Observed {
    pub verdict: u32,
    /// XDP metadata in front of the packet (empty for TC).
    pub meta: Vec<u8>,
    pub frame: Vec<u8>,
}

/// The one's-complement sum (folded, not inverted) of `data` plus `initial`, with 0 and 0xffff
/// identified: a correct checksum makes the sum of its span 0xffff, and an incremental update
/// that is right keeps the sum of the span whatever it was.
fn ones_sum(initial: u32, data: &[u8]) -> u16 {
    let s = !packet::checksum(initial, data);
    if s == 0xffff { 0 } else { s }
}

fn pseudo(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let word = |b: [u8; 4], i: usize| u32::from(u16::from_be_bytes([b[i], b[i + 1]]));
    let (s, d) = (src.octets(), dst.octets());
    word(s, 0) + word(s, 2) + word(d, 0) + word(d, 2) + u32::from(proto) + len as u32
}

fn addr_at(f: &[u8], o: usize) -> Ipv4Addr {
    Ipv4Addr::new(f[o], f[o + 1], f[o + 2], f[o + 3])
}

/// The IPv4 header sum and the L4 sum (pseudo header + the L4 bytes within the IP total length).
fn sums(f: &[u8], v: &View) -> (u16, u16) {
    let ip = ones_sum(0, &f[14..14 + v.ihl]);
    let l4 = &f[v.l4_off..14 + v.tot_len];
    let ph = pseudo(addr_at(f, 26), addr_at(f, 30), v.tuple.proto, l4.len());
    (ip, ones_sum(ph, l4))
}

fn check_mark(hook: Hook, verdict: u32, marked: Option<bool>, meta: &[u8]) -> Result<(), String> {
    let Some(want) = marked else { return Ok(()) };
    if hook != Hook::Xdp {
        return Ok(());
    }
    let has = meta == JUDGED_MARK.to_ne_bytes();
    if has != want {
        return Err(format!(
            "{}: XDP metadata {meta:02x?}, the judged mark should be {}",
            verdict_name(hook, verdict),
            if want { "there" } else { "absent" }
        ));
    }
    Ok(())
}

fn check_rewrite(
    model: &Model,
    hook: Hook,
    input: &[u8],
    v: &View,
    rw: &Rewrite,
    obs: &Observed,
) -> Result<(), String> {
    if obs.verdict != rw.verdict {
        return Err(format!(
            "verdict {}, expected {} with a translation",
            verdict_name(hook, obs.verdict),
            verdict_name(hook, rw.verdict)
        ));
    }
    check_mark(hook, obs.verdict, rw.marked, &obs.meta)?;
    let out = &obs.frame;
    if out.len() != input.len() {
        return Err(format!(
            "length {} after translation, was {}",
            out.len(),
            input.len()
        ));
    }
    let l4 = v.l4_off;
    let out_sport = u16::from_be_bytes([out[l4], out[l4 + 1]]);
    model.snat_port_ok(&rw.sport, v.tuple.proto, out_sport)?;
    let mut want = input.to_vec();
    if let Some((smac, dmac)) = rw.macs {
        want[0..6].copy_from_slice(&dmac);
        want[6..12].copy_from_slice(&smac);
    }
    if rw.ttl_dec {
        want[14 + 8] -= 1;
    }
    want[26..30].copy_from_slice(&rw.saddr.octets());
    want[30..34].copy_from_slice(&rw.daddr.octets());
    want[l4..l4 + 2].copy_from_slice(&out_sport.to_be_bytes());
    want[l4 + 2..l4 + 4].copy_from_slice(&rw.dport.to_be_bytes());
    let l4_check = v.l4_check_off()..v.l4_check_off() + 2;
    // The checksum fields are checked below, from scratch; every other byte must be exactly
    // as predicted.
    let mut got = out.clone();
    for f in [&mut got, &mut want] {
        f[24..26].fill(0);
        f[l4_check.clone()].fill(0);
    }
    if got != want {
        let i = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
        return Err(format!(
            "byte {i} is {:#04x}, expected {:#04x} (expected {}:{} -> {}:{}{}{})",
            got[i],
            want[i],
            rw.saddr,
            out_sport,
            rw.daddr,
            rw.dport,
            if rw.ttl_dec { ", TTL - 1" } else { "" },
            match rw.macs {
                Some((s, d)) => format!(", MACs {s:02x?} -> {d:02x?}"),
                None => String::new(),
            }
        ));
    }
    let (ip_in, l4_in) = sums(input, v);
    let (ip_out, l4_out) = sums(out, v);
    if ip_in != ip_out {
        return Err(format!(
            "IPv4 header checksum {:#06x} is wrong (header sum {ip_out:#06x}, input's \
             {ip_in:#06x})",
            u16::from_be_bytes([out[24], out[25]])
        ));
    }
    let c_in = u16::from_be_bytes([input[l4_check.start], input[l4_check.start + 1]]);
    let c_out = u16::from_be_bytes([out[l4_check.start], out[l4_check.start + 1]]);
    if v.tuple.proto == UDP && c_in == 0 {
        if c_out != 0 {
            return Err(format!(
                "UDP checksum {c_out:#06x}: a zero UDP checksum means none and must stay zero"
            ));
        }
    } else {
        if v.tuple.proto == UDP && c_out == 0 {
            return Err(
                "UDP checksum became zero (none): a computed zero is sent as 0xffff".into(),
            );
        }
        if l4_in != l4_out {
            return Err(format!(
                "{} checksum {c_out:#06x} is wrong (sum {l4_out:#06x}, input's {l4_in:#06x})",
                if v.tuple.proto == UDP { "UDP" } else { "TCP" }
            ));
        }
    }
    // Belt and braces for packets that were valid going in: the shared test parser agrees.
    if packet::parse_and_verify(input).is_ok() && !v.l4_lengths_odd {
        packet::parse_and_verify(out).map_err(|e| format!("packet::parse_and_verify: {e}"))?;
    }
    Ok(())
}

/// Finds the allowed outcome the observation matches; otherwise explains, per allowed outcome,
/// why not.
pub fn matching(
    model: &Model,
    hook: Hook,
    input: &[u8],
    pred: &Prediction,
    obs: &Result<Observed, String>,
) -> Result<usize, String> {
    let mut why = Vec::new();
    for (i, allowed) in pred.allowed.iter().enumerate() {
        let r = match (allowed, obs) {
            (Outcome::Refused, Err(_)) => Ok(()),
            (_, Err(e)) => Err(format!("BPF_PROG_TEST_RUN failed: {e}")),
            (Outcome::Refused, Ok(_)) => Err("the kernel ran it".to_owned()),
            (Outcome::Unchanged { verdict, marked }, Ok(o)) => {
                if o.verdict != *verdict {
                    Err(format!(
                        "verdict {}, expected {} unchanged",
                        verdict_name(hook, o.verdict),
                        verdict_name(hook, *verdict)
                    ))
                } else if o.frame != input {
                    let at = o
                        .frame
                        .iter()
                        .zip(input)
                        .position(|(a, b)| a != b)
                        .unwrap_or(o.frame.len().min(input.len()));
                    Err(format!(
                        "must come out byte-identical; differs at byte {at} (length {} -> {})",
                        input.len(),
                        o.frame.len()
                    ))
                } else {
                    check_mark(hook, o.verdict, *marked, &o.meta)
                }
            }
            (Outcome::Dropped { verdict }, Ok(o)) => {
                if o.verdict == *verdict {
                    Ok(())
                } else {
                    Err(format!(
                        "verdict {}, expected {}",
                        verdict_name(hook, o.verdict),
                        verdict_name(hook, *verdict)
                    ))
                }
            }
            (Outcome::Translated(rw), Ok(o)) => {
                let v = pred.view.as_ref().expect("a translation has a view");
                check_rewrite(model, hook, input, v, rw, o)
            }
        };
        match r {
            Ok(()) => return Ok(i),
            Err(e) => why.push(format!("  allowed #{i} {allowed:?}\n    -> {e}")),
        }
    }
    Err(why.join("\n"))
}
