//! The `(list_of_names, list_of_int)` `label.pkl` format of ST-GCN / CrosSCLR.
//!
//! The official `ntu_gendata.py` writes `pickle.dump((sample_name, list(sample_label)), f)`, and the
//! feeders read it back with `sample_name, label = pickle.load(f)`. We write pickle protocol 3 (readable
//! by Python >= 3.0) holding exactly that 2-tuple of lists.
use crate::data::npy::write_atomic;
use crate::error::{Error, Result};
use serde_pickle::value::Value;
use std::path::Path;

/// Reads a label pickle: `(names, labels)` with `names.len() == labels.len()`.
///
/// Accepts a 2-tuple (or 2-list) of lists/tuples; names may be `str` or `bytes` (Python 2 pickles);
/// labels must be Python ints that fit in i64. Anything else is an error naming the file and the place.
pub fn read_labels(path: &Path) -> Result<(Vec<String>, Vec<i64>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    crate::data::pickle_bounds::check(&bytes, path)?;
    // serde-pickle panics on some malformed inputs (e.g. sorting a set or dict keys holding NaN:
    // found by cargo fuzz); such a file is an error like any other.
    let decoded = std::panic::catch_unwind(|| {
        serde_pickle::value_from_slice(
            &bytes,
            serde_pickle::DeOptions::new()
                .decode_strings()
                .replace_unresolved_globals(),
        )
    })
    .map_err(|_| {
        Error::input(
            path,
            "pickle",
            "malformed pickle (the decoder failed on inconsistent values, e.g. NaN in a set or dict key)",
        )
    })?;
    let value =
        decoded.map_err(|e| Error::input(path, "pickle", format!("not a readable pickle: {e}")))?;
    let pair = match value {
        Value::Tuple(v) | Value::List(v) => v,
        other => {
            return Err(Error::input(
                path,
                "top level",
                format!("expected a (names, labels) tuple, found {}", kind(&other)),
            ))
        }
    };
    if pair.len() != 2 {
        return Err(Error::input(
            path,
            "top level",
            format!(
                "expected a (names, labels) 2-tuple, found {} items",
                pair.len()
            ),
        ));
    }
    let mut it = pair.into_iter();
    let names_v = seq(it.next().unwrap_or(Value::None), path, "names (item 0)")?;
    let labels_v = seq(it.next().unwrap_or(Value::None), path, "labels (item 1)")?;
    let mut names = Vec::with_capacity(names_v.len());
    for (i, v) in names_v.into_iter().enumerate() {
        match v {
            Value::String(s) => names.push(s),
            Value::Bytes(b) => names.push(String::from_utf8_lossy(&b).into_owned()),
            other => {
                return Err(Error::input(
                    path,
                    format!("names[{i}]"),
                    format!("expected a string, found {}", kind(&other)),
                ))
            }
        }
    }
    let mut labels = Vec::with_capacity(labels_v.len());
    for (i, v) in labels_v.into_iter().enumerate() {
        match v {
            Value::I64(x) => labels.push(x),
            Value::Int(big) => {
                return Err(Error::input(
                    path,
                    format!("labels[{i}]"),
                    format!("label {big} does not fit in int64"),
                ))
            }
            Value::Bool(b) => labels.push(b as i64),
            other => {
                return Err(Error::input(
                    path,
                    format!("labels[{i}]"),
                    format!("expected an int label, found {}", kind(&other)),
                ))
            }
        }
    }
    if names.len() != labels.len() {
        return Err(Error::input(
            path,
            "top level",
            format!("{} names but {} labels", names.len(), labels.len()),
        ));
    }
    Ok((names, labels))
}

fn seq(v: Value, path: &Path, place: &str) -> Result<Vec<Value>> {
    match v {
        Value::List(v) | Value::Tuple(v) => Ok(v),
        other => Err(Error::input(
            path,
            place,
            format!("expected a list, found {}", kind(&other)),
        )),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::None => "None (or an object of an unknown class, e.g. a numpy array)",
        Value::Bool(_) => "a bool",
        Value::I64(_) | Value::Int(_) => "an int",
        Value::F64(_) => "a float",
        Value::Bytes(_) => "bytes",
        Value::String(_) => "a string",
        Value::List(_) => "a list",
        Value::Tuple(_) => "a tuple",
        Value::Set(_) | Value::FrozenSet(_) => "a set",
        Value::Dict(_) => "a dict",
    }
}

/// Writes `(names, labels)` as a pickled 2-tuple of lists, atomically (`.tmp` then rename).
pub fn write_labels(path: &Path, names: &[String], labels: &[i64]) -> Result<()> {
    if names.len() != labels.len() {
        return Err(Error::Other(format!(
            "{}: {} names but {} labels",
            path.display(),
            names.len(),
            labels.len()
        )));
    }
    let value = Value::Tuple(vec![
        Value::List(names.iter().map(|s| Value::String(s.clone())).collect()),
        Value::List(labels.iter().map(|&l| Value::I64(l)).collect()),
    ]);
    let bytes = serde_pickle::value_to_vec(&value, serde_pickle::SerOptions::new())
        .map_err(|e| Error::Other(format!("{}: pickling failed: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.pkl");
        let names = vec!["a.skeleton".to_string(), "b".to_string()];
        write_labels(&p, &names, &[3, 0]).unwrap();
        assert_eq!(read_labels(&p).unwrap(), (names, vec![3, 0]));
        assert!(!dir.path().join("l.pkl.tmp").exists());
    }

    #[test]
    fn rejects_mismatch_and_non_int() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.pkl");
        let v = Value::Tuple(vec![
            Value::List(vec![Value::String("a".into()), Value::String("b".into())]),
            Value::List(vec![Value::I64(1)]),
        ]);
        std::fs::write(
            &p,
            serde_pickle::value_to_vec(&v, Default::default()).unwrap(),
        )
        .unwrap();
        let e = read_labels(&p).unwrap_err().to_string();
        assert!(
            e.contains("bad.pkl") && e.contains("2 names but 1 labels"),
            "{e}"
        );
        let v = Value::Tuple(vec![
            Value::List(vec![Value::String("a".into())]),
            Value::List(vec![Value::F64(1.5)]),
        ]);
        std::fs::write(
            &p,
            serde_pickle::value_to_vec(&v, Default::default()).unwrap(),
        )
        .unwrap();
        let e = read_labels(&p).unwrap_err().to_string();
        assert!(e.contains("labels[0]") && e.contains("a float"), "{e}");
    }
}
