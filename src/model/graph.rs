//! ST-GCN spatial partition matrices (official max_hop=1 quirk for NTU-25).
//!
//! Re-implements the official `Graph(layout, strategy='spatial', max_hop=1, dilation=1)` for any
//! [`Layout`]: adjacency with self-loops, hop distances, `normalize_digraph` (each entry
//! `adjacency[j, i] / deg(i)`, `j` = source, `i` = destination) and the spatial split into
//! root / close / further by distance to the centre joint.
//!
//! [`PartitionKind::OfficialSpatial`] keeps the official quirk: the hop table only knows distances
//! 0 and 1, every other distance is infinite, and infinite distances to the centre compare equal
//! (`inf == inf`), so far-away joints count as "equidistant". [`PartitionKind::TrueDistanceSpatial`]
//! uses true breadth-first distances to the centre instead (the clean alternative).
use crate::data::layout::{Layout, PartitionKind};
use tch::{Kind, Tensor};

/// Number of spatial partitions K of the spatial strategy (root, close, further).
pub const NUM_PARTITIONS: usize = 3;

/// A hop distance; `None` is infinity (unreachable within the hop limit).
pub type Hop = Option<usize>;

/// Hop distances between all joint pairs, `dist[i][j]`, with distances above `max_hop` infinite
/// (`None`), exactly as the official `get_hop_distance` (matrix powers of the adjacency).
pub fn hop_distance(num_joints: usize, edges: &[(usize, usize)], max_hop: usize) -> Vec<Vec<Hop>> {
    let mut dist = vec![vec![None; num_joints]; num_joints];
    for (start, row) in dist.iter_mut().enumerate() {
        // Breadth-first search gives the smallest d with (A^d)[start, j] > 0, as the official code.
        row[start] = Some(0);
        let mut frontier = vec![start];
        let mut d = 0;
        while !frontier.is_empty() && d < max_hop {
            d += 1;
            let mut next = Vec::new();
            for &u in &frontier {
                for &(a, b) in edges {
                    let w = if a == u {
                        b
                    } else if b == u {
                        a
                    } else {
                        continue;
                    };
                    if row[w].is_none() {
                        row[w] = Some(d);
                        next.push(w);
                    }
                }
            }
            frontier = next;
        }
    }
    dist
}

/// Orders hop distances with infinity largest; `inf == inf` (the official numpy behaviour).
fn hop_key(h: Hop) -> usize {
    h.unwrap_or(usize::MAX)
}

/// The three spatial partition matrices as `[k][source][destination]` f64 values.
pub fn partition_values(layout: &Layout) -> Vec<Vec<Vec<f64>>> {
    let v = layout.num_joints();
    // Official: max_hop = 1, dilation = 1 -> valid hops 0 and 1.
    const MAX_HOP: usize = 1;
    let hop = hop_distance(v, &layout.edges, MAX_HOP);
    let centre_dist: Vec<Hop> = match layout.partition {
        PartitionKind::OfficialSpatial => (0..v).map(|j| hop[j][layout.center]).collect(),
        PartitionKind::TrueDistanceSpatial => {
            let full = hop_distance(v, &layout.edges, v);
            (0..v).map(|j| full[j][layout.center]).collect()
        }
    };
    // adjacency[j][i] = 1 where hop <= max_hop (self-loops included); normalize_digraph divides
    // column i by its sum deg(i).
    let adjacency: Vec<Vec<f64>> = (0..v)
        .map(|j| {
            (0..v)
                .map(|i| if hop[j][i].is_some() { 1.0 } else { 0.0 })
                .collect()
        })
        .collect();
    let degree: Vec<f64> = (0..v)
        .map(|i| (0..v).map(|j| adjacency[j][i]).sum())
        .collect();
    let norm = |j: usize, i: usize| {
        if degree[i] > 0.0 {
            adjacency[j][i] / degree[i]
        } else {
            0.0
        }
    };

    let mut a = vec![vec![vec![0.0; v]; v]; NUM_PARTITIONS];
    for h in 0..=MAX_HOP {
        for i in 0..v {
            for j in 0..v {
                if hop[j][i] != Some(h) {
                    continue;
                }
                let (dj, di) = (hop_key(centre_dist[j]), hop_key(centre_dist[i]));
                // hop 0 -> partition 0 (root); hop 1 -> root and close merged in 1, further in 2.
                let k = if h == 0 || dj >= di { h } else { 2 };
                a[k][j][i] = norm(j, i);
            }
        }
    }
    a
}

/// The spatial partition `(3, V, V)` float32 on the CPU, index order `A[k][source][destination]`:
/// the output at joint `w` is `sum_k sum_v x_k[v] * A[k][v][w]`.
pub fn partition(layout: &Layout) -> Tensor {
    let v = layout.num_joints() as i64;
    let flat: Vec<f32> = partition_values(layout)
        .into_iter()
        .flatten()
        .flatten()
        .map(|x| x as f32)
        .collect();
    Tensor::from_slice(&flat)
        .view([NUM_PARTITIONS as i64, v, v])
        .to_kind(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference 4.1 lists (1-based `source -> destination`).
    const A1_EDGES: [(usize, usize); 40] = [
        (1, 2),
        (1, 13),
        (1, 17),
        (2, 21),
        (3, 21),
        (4, 3),
        (5, 21),
        (6, 5),
        (6, 7),
        (7, 6),
        (7, 8),
        (8, 7),
        (8, 23),
        (9, 21),
        (10, 9),
        (10, 11),
        (11, 10),
        (11, 12),
        (12, 11),
        (12, 25),
        (13, 1),
        (13, 14),
        (14, 13),
        (14, 15),
        (15, 14),
        (15, 16),
        (16, 15),
        (17, 1),
        (17, 18),
        (18, 17),
        (18, 19),
        (19, 18),
        (19, 20),
        (20, 19),
        (22, 23),
        (23, 8),
        (23, 22),
        (24, 25),
        (25, 12),
        (25, 24),
    ];
    const A2_EDGES: [(usize, usize); 8] = [
        (2, 1),
        (3, 4),
        (5, 6),
        (9, 10),
        (21, 2),
        (21, 3),
        (21, 5),
        (21, 9),
    ];

    /// Sum over partitions and sources of the entries into destination `d`.
    fn column_sum(a: &[Vec<Vec<f64>>], d: usize) -> f64 {
        a.iter()
            .flat_map(|ak| ak.iter().map(move |row| row[d]))
            .sum()
    }

    fn ntu_degree(j: usize) -> f64 {
        match j {
            21 => 5.0,
            1 => 4.0,
            4 | 16 | 20 | 22 | 24 => 2.0,
            _ => 3.0,
        }
    }

    #[test]
    fn ntu25_matches_reference_lists() {
        let a = partition_values(&Layout::ntu25());
        let mut expected = vec![vec![vec![0.0; 25]; 25]; 3];
        for j in 1..=25 {
            expected[0][j - 1][j - 1] = 1.0 / ntu_degree(j);
        }
        for &(s, d) in &A1_EDGES {
            expected[1][s - 1][d - 1] = 1.0 / ntu_degree(d);
        }
        for &(s, d) in &A2_EDGES {
            expected[2][s - 1][d - 1] = 1.0 / ntu_degree(d);
        }
        for k in 0..3 {
            for s in 0..25 {
                for d in 0..25 {
                    assert!(
                        (a[k][s][d] - expected[k][s][d]).abs() < 1e-12,
                        "A{k}[{}][{}] = {} expected {}",
                        s + 1,
                        d + 1,
                        a[k][s][d],
                        expected[k][s][d]
                    );
                }
            }
        }
        // Columns of A0 + A1 + A2 sum to 1.
        for d in 0..25 {
            assert!((column_sum(&a, d) - 1.0).abs() < 1e-12);
        }
        let t = partition(&Layout::ntu25());
        assert_eq!(t.size(), vec![3, 25, 25]);
        assert_eq!(t.kind(), Kind::Float);
    }

    #[test]
    fn true_distance_partition_splits_by_real_distance() {
        let mut layout = Layout::ntu25();
        layout.partition = PartitionKind::TrueDistanceSpatial;
        let a = partition_values(&layout);
        // Joint 6 (left elbow) -> 7 (wrist): 7 is farther from the centre, so 6 -> 7 is
        // "further" (partition 2) and 7 -> 6 is "close" (partition 1).
        assert!(a[2][5][6] > 0.0 && a[1][5][6] == 0.0);
        assert!(a[1][6][5] > 0.0 && a[2][6][5] == 0.0);
        // Same adjacency support as the official version.
        let official = partition_values(&Layout::ntu25());
        for s in 0..25 {
            for d in 0..25 {
                let x: f64 = (0..3).map(|k| a[k][s][d]).sum();
                let y: f64 = (0..3).map(|k| official[k][s][d]).sum();
                assert!((x - y).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn works_for_other_layouts() {
        for layout in [Layout::kinect20(), Layout::msr20()] {
            let a = partition_values(&layout);
            let v = layout.num_joints();
            for d in 0..v {
                let sum = column_sum(&a, d);
                assert!(
                    (sum - 1.0).abs() < 1e-12,
                    "{}: column {d} sums to {sum}",
                    layout.name
                );
            }
        }
    }
}
