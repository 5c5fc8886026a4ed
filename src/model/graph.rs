//! ST-GCN spatial partition matrices (official max_hop=1 quirk for NTU-25).
