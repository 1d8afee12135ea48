//! `cfsd --config FILE`: a TOML file whose keys are the flags' long names (`max_lease`
//! or `max-lease`), turned into arguments placed before the command line's own, so a flag
//! given on the command line overrides the file's value (for a repeatable flag such as
//! `keep`, the command line's list replaces the file's).
//!
//! ```toml
//! listen = "0.0.0.0:4000"
//! advertise = "203.0.113.7:4000"
//! data = "/var/lib/cfsd"
//! join = "ring.example.org:4000"
//! max_lease = "30d"
//! keep = ["FSID:5"]
//! ```

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("reading the config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the config file {path} is not valid TOML")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{path}: unknown key `{key}`; the keys are cfsd's flags without the dashes (cfsd --help lists them)")]
    UnknownKey { path: PathBuf, key: String },
    #[error("{path}: key `{key}` must be a string, a number, true, or a list of those")]
    BadValue { path: PathBuf, key: String },
    #[error("--config needs a file name")]
    MissingPath,
}

/// Where `--config` points in `argv`, if anywhere.
fn config_path(argv: &[OsString]) -> Result<Option<PathBuf>, ConfigFileError> {
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--" {
            break;
        }
        if s == "--config" {
            return it
                .next()
                .map(|p| Some(PathBuf::from(p)))
                .ok_or(ConfigFileError::MissingPath);
        }
        if let Some(p) = s.strip_prefix("--config=") {
            return Ok(Some(PathBuf::from(p)));
        }
    }
    Ok(None)
}

/// The long flags `argv` gives (without dashes), up to a `--`.
fn given(argv: &[OsString]) -> HashSet<String> {
    argv.iter()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .take_while(|a| a != "--")
        .filter_map(|a| {
            let name = a.strip_prefix("--")?;
            Some(name.split('=').next().unwrap_or(name).to_string())
        })
        .collect()
}

fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        _ => None,
    }
}

/// `argv` with the arguments of the file named by its `--config` (if any) inserted after
/// the program name. `flags` are the long names the program accepts (`max-lease`), and
/// `switches` those that take no value (`true` in the file gives the switch).
pub fn merge_config_file(
    argv: Vec<OsString>,
    flags: &HashSet<String>,
    switches: &HashSet<String>,
) -> Result<Vec<OsString>, ConfigFileError> {
    let Some(path) = config_path(&argv)? else {
        return Ok(argv);
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigFileError::Read {
        path: path.clone(),
        source,
    })?;
    let from_file = file_args(&path, &text, flags, switches, &given(&argv))?;
    let mut out = Vec::with_capacity(argv.len() + from_file.len());
    out.extend(argv.first().cloned());
    out.extend(from_file.into_iter().map(OsString::from));
    out.extend(argv.into_iter().skip(1));
    Ok(out)
}

fn file_args(
    path: &Path,
    text: &str,
    flags: &HashSet<String>,
    switches: &HashSet<String>,
    given: &HashSet<String>,
) -> Result<Vec<String>, ConfigFileError> {
    let table: toml::Table = text.parse().map_err(|source| ConfigFileError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (key, value) in &table {
        let name = key.replace('_', "-");
        let bad = || ConfigFileError::BadValue {
            path: path.to_path_buf(),
            key: key.clone(),
        };
        if name == "config" || !flags.contains(&name) {
            return Err(ConfigFileError::UnknownKey {
                path: path.to_path_buf(),
                key: key.clone(),
            });
        }
        if given.contains(&name) {
            continue;
        }
        let flag = format!("--{name}");
        match value {
            toml::Value::Boolean(b) if switches.contains(&name) => {
                if *b {
                    out.push(flag);
                }
            }
            // One argument `--flag=value`, so a value that starts with `-` stays a value.
            toml::Value::Array(items) => {
                for item in items {
                    out.push(format!("{flag}={}", scalar(item).ok_or_else(bad)?));
                }
            }
            v => out.push(format!("{flag}={}", scalar(v).ok_or_else(bad)?)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> HashSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn argv(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    fn run(text: &str, cli: &[&str]) -> Result<Vec<String>, ConfigFileError> {
        let dir = std::env::temp_dir().join(format!("cfsd-conf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!("{}.toml", text.len()));
        std::fs::write(&p, text).unwrap();
        let mut a = vec![
            "cfsd".to_string(),
            "--config".into(),
            p.display().to_string(),
        ];
        a.extend(cli.iter().map(|s| s.to_string()));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let flags = set(&["listen", "data", "max-lease", "keep", "replicas", "verbose"]);
        let out = merge_config_file(argv(&a), &flags, &set(&["verbose"]))?;
        let _ = std::fs::remove_file(&p);
        Ok(out
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .filter(|s| !s.ends_with(".toml") && s != "--config")
            .collect())
    }

    #[test]
    fn file_keys_become_flags_and_the_command_line_wins() {
        let out = run(
            "listen = \"127.0.0.1:4000\"\nmax_lease = \"30d\"\nreplicas = 5\nkeep = [\"a:1\", \"b:2\"]\nverbose = true\n",
            &["--replicas", "3", "--data=/d"],
        )
        .unwrap();
        // The file's arguments come first, so the command line's later ones win.
        let joined = out.join(" ");
        assert!(joined.contains("--listen=127.0.0.1:4000"), "{joined}");
        assert!(joined.contains("--max-lease=30d"), "{joined}");
        assert!(joined.contains("--keep=a:1 --keep=b:2"), "{joined}");
        assert!(joined.contains("--verbose"), "{joined}");
        assert!(
            !joined.contains("--replicas=5"),
            "the command line's replicas replace the file's: {joined}"
        );
        assert!(joined.ends_with("--replicas 3 --data=/d"), "{joined}");
    }

    #[test]
    fn unknown_keys_and_odd_values_are_refused_by_name() {
        assert!(matches!(
            run("lisen = \"x\"\n", &[]),
            Err(ConfigFileError::UnknownKey { key, .. }) if key == "lisen"
        ));
        assert!(matches!(
            run("config = \"x\"\n", &[]),
            Err(ConfigFileError::UnknownKey { .. })
        ));
        assert!(matches!(
            run("listen = { a = 1 }\n", &[]),
            Err(ConfigFileError::BadValue { .. })
        ));
        assert!(matches!(
            run("listen = \n", &[]),
            Err(ConfigFileError::Parse { .. })
        ));
    }

    #[test]
    fn without_config_the_arguments_are_untouched() {
        let a = argv(&["cfsd", "--listen", "x"]);
        assert_eq!(
            merge_config_file(a.clone(), &set(&["listen"]), &set(&[])).unwrap(),
            a
        );
        assert!(matches!(
            merge_config_file(argv(&["cfsd", "--config"]), &set(&[]), &set(&[])),
            Err(ConfigFileError::MissingPath)
        ));
    }
}
