//! Which encoder of a weights file a command reads when no `--prefix` is given: the same rule in
//! every command (`embed`, `linear`, `knn`, `semi`, `finetune`, ...).
//!
//! The encoders in a file are found by their first layer, `<prefix>st_gcn_networks.0.gcn.conv.weight`
//! (after removing a DataParallel `module.`). Then, in order:
//! 1. the stream's own query encoder when the file has it (`encoder_q.` for joint,
//!    `encoder_q_motion.` for motion, ...: our checkpoints and the official CrosSCLR ones);
//! 2. the file's only encoder (a bare encoder state dict: prefix `""`);
//! 3. the file's only query encoder, key encoders (`encoder_k*`) set aside (a SkeletonCLR
//!    checkpoint trained on any view keeps its encoder under `encoder_q.`);
//! 4. otherwise the choice is ambiguous: an error that lists the encoders in the file.

/// The first-layer key that marks an ST-GCN encoder.
const FIRST_LAYER: &str = "st_gcn_networks.0.gcn.conv.weight";

/// The prefixes of the ST-GCN encoders among `keys`, sorted (`""` for a bare encoder).
pub fn encoder_prefixes<'a>(keys: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = keys
        .into_iter()
        .map(|k| k.strip_prefix("module.").unwrap_or(k))
        .filter_map(|k| k.strip_suffix(FIRST_LAYER).map(str::to_string))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A prefix chosen from a file, and why (for the message that says which one was used).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetectedPrefix {
    pub prefix: String,
    pub reason: &'static str,
}

/// Chooses the encoder to read from a file with the encoder prefixes `found` (see
/// [`encoder_prefixes`]) for a stream whose own query encoder is `preferred`; `Err` names the
/// encoders when the choice is ambiguous or there is none.
pub fn detect_prefix(found: &[String], preferred: &str) -> Result<DetectedPrefix, String> {
    if found.iter().any(|p| p == preferred) {
        return Ok(DetectedPrefix {
            prefix: preferred.to_string(),
            reason: "this stream's query encoder",
        });
    }
    if let [only] = found {
        return Ok(DetectedPrefix {
            prefix: only.clone(),
            reason: "the file's only encoder",
        });
    }
    let queries: Vec<&String> = found
        .iter()
        .filter(|p| !p.starts_with("encoder_k"))
        .collect();
    if let [only] = queries.as_slice() {
        return Ok(DetectedPrefix {
            prefix: (*only).clone(),
            reason: "the file's only query encoder",
        });
    }
    if found.is_empty() {
        return Err(format!(
            "no ST-GCN encoder in the file (no key ends with '{FIRST_LAYER}')"
        ));
    }
    let names: Vec<String> = found.iter().map(|p| format!("'{p}'")).collect();
    Err(format!(
        "{} encoders in the file ({}), none of them '{preferred}': name one with --prefix",
        found.len(),
        names.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(prefixes: &[&str]) -> Vec<String> {
        prefixes
            .iter()
            .flat_map(|p| {
                [
                    format!("{p}{FIRST_LAYER}"),
                    format!("{p}data_bn.weight"),
                    format!("{p}fc.weight"),
                ]
            })
            .collect()
    }

    fn detect(prefixes: &[&str], preferred: &str) -> Result<DetectedPrefix, String> {
        let k = keys(prefixes);
        detect_prefix(&encoder_prefixes(k.iter().map(String::as_str)), preferred)
    }

    #[test]
    fn unambiguous_files_resolve_and_ambiguous_ones_name_the_encoders() {
        // Our SkeletonCLR / CrosSCLR checkpoints: the stream's own query encoder.
        let d = detect(&["encoder_q.", "encoder_k."], "encoder_q.").unwrap();
        assert_eq!(d.prefix, "encoder_q.");
        let cross = [
            "encoder_q.",
            "encoder_k.",
            "encoder_q_motion.",
            "encoder_k_motion.",
        ];
        assert_eq!(
            detect(&cross, "encoder_q_motion.").unwrap().prefix,
            "encoder_q_motion."
        );
        // A bare encoder (the official fixture), also under DataParallel's `module.`.
        assert_eq!(detect(&[""], "encoder_q.").unwrap().prefix, "");
        assert_eq!(detect(&["module."], "encoder_q.").unwrap().prefix, "");
        // SkeletonCLR trained on motion, evaluated as the motion stream.
        let d = detect(&["encoder_q.", "encoder_k."], "encoder_q_motion.").unwrap();
        assert_eq!(
            (d.prefix.as_str(), d.reason),
            ("encoder_q.", "the file's only query encoder")
        );
        // Two query encoders, neither the bone one: ambiguous.
        let e = detect(&cross, "encoder_q_bone.").unwrap_err();
        assert!(e.contains("'encoder_q.'") && e.contains("--prefix"), "{e}");
        assert!(detect(&[], "encoder_q.")
            .unwrap_err()
            .contains("no ST-GCN encoder"));
    }
}
