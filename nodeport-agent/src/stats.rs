//! Reading `np_stats`: one `Traffic` per `Counter` per CPU, summed over CPUs here (per-CPU slots
//! let the programs count without atomics; only the reader pays for the sum).

use std::{borrow::Borrow, path::Path};

use aya::maps::{Map, MapData, PerCpuArray};
use nodeport_common::{Counter, Traffic, map_names};

use crate::{Error, pin::PinLayout};

/// A snapshot of the dataplane's counters, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    values: [Traffic; Counter::COUNT as usize],
}

impl Stats {
    /// Reads the counters of the dataplane pinned under `layout` (no program needs to be loaded by
    /// this process: this is what `nodeport-agent stats` and the tests use).
    pub fn read_pinned(layout: &PinLayout) -> Result<Self, Error> {
        Self::read_pinned_path(&layout.map(map_names::COUNTERS))
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
        delta
    }
}

fn sum<'a>(values: impl Iterator<Item = &'a Traffic>) -> Traffic {
    values.fold(Traffic::default(), |acc, t| Traffic {
        packets: acc.packets.wrapping_add(t.packets),
        bytes: acc.bytes.wrapping_add(t.bytes),
    })
}

/// Renders counters as `name packets bytes` lines, aligned, for the CLI.
pub fn render(stats: &Stats) -> String {
    let width = Counter::ALL
        .iter()
        .map(|c| c.name().len())
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
        assert_eq!(text.lines().count(), 1 + Counter::COUNT as usize);
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
