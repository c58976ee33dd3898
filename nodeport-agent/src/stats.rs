//! Reading `np_stats`: one `Traffic` per `Counter` per CPU, summed over CPUs here (per-CPU slots
//! let the programs count without atomics; only the reader pays for the sum); and `np_sk_stats`,
//! the socket programs' calls per `SockCounter`.

use std::{borrow::Borrow, path::Path};

use aya::maps::{Map, MapData, PerCpuArray};
use nodeport_common::{Counter, SockCounter, Traffic, map_names};

use crate::{Error, pin::PinLayout};

/// A snapshot of the dataplane's counters, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    values: [Traffic; Counter::COUNT as usize],
    sock: [u64; SockCounter::COUNT as usize],
}

impl Stats {
    /// Reads the counters of the dataplane pinned under `layout` (no program needs to be loaded by
    /// this process: this is what `nodeport-agent stats` and the tests use).
    pub fn read_pinned(layout: &PinLayout) -> Result<Self, Error> {
        let mut stats = Self::read_pinned_path(&layout.map(map_names::COUNTERS))?;
        // Pinned by a build without socket load balancing: its counters read as zero.
        let sock_path = layout.map(map_names::SOCK_COUNTERS);
        if sock_path.exists() {
            let data =
                MapData::from_pin(&sock_path).map_err(Error::map(map_names::SOCK_COUNTERS))?;
            let map = Map::from_map_data(data).map_err(Error::map(map_names::SOCK_COUNTERS))?;
            let array: PerCpuArray<MapData, u64> = map
                .try_into()
                .map_err(Error::map(map_names::SOCK_COUNTERS))?;
            stats.read_sock(&array)?;
        }
        Ok(stats)
    }

    /// Adds the socket programs' counters from an open `np_sk_stats`.
    pub fn read_sock<T: Borrow<MapData>>(
        &mut self,
        array: &PerCpuArray<T, u64>,
    ) -> Result<(), Error> {
        let n = array.len().min(SockCounter::COUNT);
        for index in 0..n {
            let per_cpu = array
                .get(&index, 0)
                .map_err(Error::map(map_names::SOCK_COUNTERS))?;
            self.sock[index as usize] = per_cpu.iter().fold(0u64, |a, v| a.wrapping_add(*v));
        }
        Ok(())
    }

    /// How many socket calls the socket programs handled this way.
    pub fn sock(&self, counter: SockCounter) -> u64 {
        self.sock[counter as usize]
    }

    /// Every socket counter with its value, in `SockCounter::ALL` order.
    pub fn sock_iter(&self) -> impl Iterator<Item = (SockCounter, u64)> + '_ {
        SockCounter::ALL.iter().map(|&c| (c, self.sock(c)))
    }

    pub fn read_pinned_path(path: &Path) -> Result<Self, Error> {
        let data = MapData::from_pin(path).map_err(Error::map(path.display().to_string()))?;
        let map = Map::from_map_data(data).map_err(Error::map(map_names::COUNTERS))?;
        let array: PerCpuArray<MapData, Traffic> =
            map.try_into().map_err(Error::map(map_names::COUNTERS))?;
        Self::from_map(&array)
    }

    /// Reads the counters from an open map (e.g. `Dataplane::stats`).
    pub fn from_map<T: Borrow<MapData>>(array: &PerCpuArray<T, Traffic>) -> Result<Self, Error> {
        let mut stats = Self::default();
        // A map from a build with fewer counters simply leaves the newer ones at zero.
        let n = array.len().min(Counter::COUNT);
        for index in 0..n {
            let per_cpu = array
                .get(&index, 0)
                .map_err(Error::map(map_names::COUNTERS))?;
            stats.values[index as usize] = sum(per_cpu.iter());
        }
        Ok(stats)
    }

    pub fn get(&self, counter: Counter) -> Traffic {
        self.values[counter as usize]
    }

    /// Every counter with its value, in `Counter::ALL` order.
    pub fn iter(&self) -> impl Iterator<Item = (Counter, Traffic)> + '_ {
        Counter::ALL.iter().map(|&c| (c, self.get(c)))
    }

    /// All packets the programs saw. Every packet is counted under exactly one counter.
    pub fn total(&self) -> Traffic {
        sum(self.values.iter())
    }

    /// Counter-wise `self - earlier` (saturating: a map recreated in between reads as zero).
    pub fn since(&self, earlier: &Stats) -> Stats {
        let mut delta = Stats::default();
        for (i, (now, then)) in self.values.iter().zip(earlier.values.iter()).enumerate() {
            delta.values[i] = Traffic {
                packets: now.packets.saturating_sub(then.packets),
                bytes: now.bytes.saturating_sub(then.bytes),
            };
        }
        for (i, (now, then)) in self.sock.iter().zip(earlier.sock.iter()).enumerate() {
            delta.sock[i] = now.saturating_sub(*then);
        }
        delta
    }
}

fn sum<'a>(values: impl Iterator<Item = &'a Traffic>) -> Traffic {
    values.fold(Traffic::default(), |acc, t| Traffic {
        packets: acc.packets.wrapping_add(t.packets),
        bytes: acc.bytes.wrapping_add(t.bytes),
    })
}

/// Renders counters as `name packets bytes` lines, aligned, for the CLI; then the socket
/// counters as `name calls`.
pub fn render(stats: &Stats) -> String {
    let width = Counter::ALL
        .iter()
        .map(|c| c.name().len())
        .chain(SockCounter::ALL.iter().map(|c| c.name().len()))
        .max()
        .unwrap_or(0);
    let mut out = format!("{:width$}  {:>12}  {:>14}\n", "counter", "packets", "bytes");
    for (counter, t) in stats.iter() {
        out.push_str(&format!(
            "{:width$}  {:>12}  {:>14}\n",
            counter.name(),
            t.packets,
            t.bytes
        ));
    }
    out.push_str(&format!("{:width$}  {:>12}\n", "socket counter", "calls"));
    for (counter, calls) in stats.sock_iter() {
        out.push_str(&format!("{:width$}  {:>12}\n", counter.name(), calls));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(counter: Counter, packets: u64, bytes: u64) -> Stats {
        let mut s = Stats::default();
        s.values[counter as usize] = Traffic { packets, bytes };
        s
    }

    #[test]
    fn since_subtracts_per_counter_and_saturates() {
        let later = with(Counter::PassNotIpv4, 10, 1000);
        let earlier = with(Counter::PassNotIpv4, 4, 400);
        assert_eq!(
            later.since(&earlier).get(Counter::PassNotIpv4),
            Traffic {
                packets: 6,
                bytes: 600
            }
        );
        assert_eq!(earlier.since(&later).total(), Traffic::default());
    }

    #[test]
    fn render_lists_every_counter_by_name() {
        let text = render(&with(Counter::PassNotNodePort, 3, 180));
        assert_eq!(
            text.lines().count(),
            2 + (Counter::COUNT + SockCounter::COUNT) as usize
        );
        assert!(
            text.lines()
                .any(|l| l.split_whitespace().eq(["sock_translated", "0"]))
        );
        let line = text
            .lines()
            .find(|l| l.starts_with("pass_not_nodeport "))
            .expect("pass_not_nodeport line");
        assert!(
            line.split_whitespace()
                .eq(["pass_not_nodeport", "3", "180"])
        );
    }
}
