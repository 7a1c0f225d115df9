//! A YAML stream (`---`-separated documents) of API objects into [`Objects`].
//!
//! Each document is read as a generic YAML value first, so that a schema error can name the
//! object (kind and `metadata.name`) it is in; then it is converted to its type with the field
//! path tracked. A `v1` `List` (what `kubectl get -o yaml` prints for several objects) is
//! flattened into its `items`.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_yaml::Value;

use super::api::{self, InitiatorGroup, InitiatorGroupBinding, Secret, Target};
use super::error::{ConfigError, ObjectError, ObjectKind, Problem};
use super::resolve::Objects;

/// Parsed objects and where each came from.
#[derive(Debug, Default)]
pub(crate) struct Parsed {
    pub objects: Objects,
    targets: Vec<String>,
    groups: Vec<String>,
    bindings: Vec<String>,
    secrets: Vec<String>,
}

impl Parsed {
    /// Fills in `location` of errors that point at a parsed object.
    pub fn locate(&self, mut errors: Vec<ObjectError>) -> Vec<ObjectError> {
        for e in &mut errors {
            let list = match e.kind {
                ObjectKind::Target => &self.targets,
                ObjectKind::InitiatorGroup => &self.groups,
                ObjectKind::InitiatorGroupBinding => &self.bindings,
                ObjectKind::Secret => &self.secrets,
                _ => continue,
            };
            if let Some(loc) = e.index.and_then(|i| list.get(i)) {
                e.location.get_or_insert_with(|| loc.clone());
            }
        }
        errors
    }
}

/// Parses every document of `yaml`. Schema errors of all documents are reported together;
/// a YAML syntax error stops at its document.
pub(crate) fn parse_objects(yaml: &str, origin: &str) -> Result<Parsed, ConfigError> {
    let mut parsed = Parsed::default();
    let mut errors = Vec::new();
    for (i, document) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let number = i + 1;
        let value = Value::deserialize(document).map_err(|cause| ConfigError::Yaml {
            origin: origin.to_owned(),
            document: number,
            cause,
        })?;
        parsed.add_value(value, format!("document {number}"), &mut errors);
    }
    if errors.is_empty() {
        Ok(parsed)
    } else {
        Err(ConfigError::Invalid {
            origin: origin.to_owned(),
            errors,
        })
    }
}

impl Parsed {
    fn add_value(&mut self, value: Value, location: String, errors: &mut Vec<ObjectError>) {
        if value.is_null() {
            // An empty document, e.g. a trailing `---`.
            return;
        }
        let text = |key: &str| {
            value
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        let api_version = text("apiVersion");
        let kind = text("kind");
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let mut error = |kind: ObjectKind, field: &str, problem| {
            let mut e = ObjectError::new(kind, &name, None, field, problem);
            e.location = Some(location.clone());
            errors.push(e);
        };
        if !value.is_mapping() {
            error(
                ObjectKind::Other(String::new()),
                "",
                Problem::Schema("expected an object (a YAML mapping)".to_owned()),
            );
            return;
        }

        match kind.as_str() {
            "List" if api_version == "v1" => match value.get("items") {
                Some(Value::Sequence(items)) => {
                    for (i, item) in items.iter().enumerate() {
                        self.add_value(item.clone(), format!("{location}, items[{i}]"), errors);
                    }
                }
                None | Some(Value::Null) => {}
                Some(_) => error(
                    ObjectKind::Other(kind.clone()),
                    "items",
                    Problem::Schema("expected a list".to_owned()),
                ),
            },
            "Target" => {
                if let Some(t) =
                    convert::<Target>(value, ObjectKind::Target, api::API_VERSION, &mut error)
                {
                    self.objects.targets.push(t);
                    self.targets.push(location);
                }
            }
            "InitiatorGroup" => {
                if let Some(g) = convert::<InitiatorGroup>(
                    value,
                    ObjectKind::InitiatorGroup,
                    api::API_VERSION,
                    &mut error,
                ) {
                    self.objects.initiator_groups.push(g);
                    self.groups.push(location);
                }
            }
            "InitiatorGroupBinding" => {
                if let Some(b) = convert::<InitiatorGroupBinding>(
                    value,
                    ObjectKind::InitiatorGroupBinding,
                    api::API_VERSION,
                    &mut error,
                ) {
                    self.objects.bindings.push(b);
                    self.bindings.push(location);
                }
            }
            "Secret" => {
                if let Some(s) =
                    convert::<Secret>(value, ObjectKind::Secret, api::CORE_API_VERSION, &mut error)
                {
                    self.objects.secrets.push(s);
                    self.secrets.push(location);
                }
            }
            _ => error(
                ObjectKind::Other(kind.clone()),
                "kind",
                Problem::UnknownKind {
                    api_version: api_version.clone(),
                    kind: kind.clone(),
                },
            ),
        }
    }
}

/// Checks `apiVersion` and converts `value` to `T`, reporting the field path of a schema error.
fn convert<T: DeserializeOwned>(
    value: Value,
    kind: ObjectKind,
    api_version: &'static str,
    error: &mut dyn FnMut(ObjectKind, &str, Problem),
) -> Option<T> {
    let found = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    if found != api_version {
        error(
            kind,
            "apiVersion",
            Problem::WrongApiVersion {
                found: found.to_owned(),
                expected: api_version,
            },
        );
        return None;
    }
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(object) => Some(object),
        Err(e) => {
            let path = e.path().to_string();
            // serde_path_to_error prints the root as ".".
            let field = if path == "." { String::new() } else { path };
            error(kind, &field, Problem::Schema(e.into_inner().to_string()));
            None
        }
    }
}
