//! The shared-key workload's one operation, as the simulation's clients and the fault runner's
//! send it: a put of a unique value, a compare-and-set from the value last seen, or a
//! linearizable read, with the answer as the linearizability checker reads it.

use std::collections::BTreeMap;

use maos_client::Client;

use crate::linearizability::{Input, Output};

/// Send operation `kind` (0 put, 1 compare-and-set, else read) of `value` on `key`; `seen` is
/// the value this client last saw of each key, updated from the answer.
pub async fn shared_operation(
    client: &Client,
    kind: u32,
    key: &str,
    value: &str,
    seen: &mut BTreeMap<String, Option<String>>,
) -> (Input, Output) {
    let (input, output) = match kind {
        0 => {
            let output = match client.put(key, value).await {
                Ok(_) => Output::Written,
                Err(_) => Output::Unknown,
            };
            (Input::Put { value: value.to_string() }, output)
        }
        1 => {
            let expected = seen.get(key).cloned().flatten();
            let output = match client.compare_and_set(key, expected.as_deref(), value).await {
                Ok(Ok(_)) => Output::Swapped,
                Ok(Err(current)) => Output::CompareFailed { current },
                Err(_) => Output::Unknown,
            };
            (Input::CompareAndSet { expected, value: value.to_string() }, output)
        }
        _ => {
            let output = match client.get(key, false).await {
                Ok(found) => Output::Read { value: found.map(|(value, _)| value) },
                Err(_) => Output::Unknown,
            };
            (Input::Get, output)
        }
    };
    match &output {
        Output::Written | Output::Swapped => {
            seen.insert(key.to_string(), Some(value.to_string()));
        }
        Output::CompareFailed { current } | Output::Read { value: current } => {
            seen.insert(key.to_string(), current.clone());
        }
        Output::Unknown => {}
    }
    (input, output)
}
