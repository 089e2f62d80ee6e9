//! `fedcart-client schema`: a first `[data.schema]` for a customer table,
//! drafted from the table itself (see `Schema::draft`) for the merchant to
//! review and paste into `merchant.toml`.

use std::path::PathBuf;

use fedcart_common::data::orders::Delimiter;
use fedcart_common::data::tabular::{DataError, DraftOptions, Schema};

/// Arguments of `fedcart-client schema`.
#[derive(Debug, Clone, clap::Args)]
pub struct SchemaArgs {
    /// The customer table (one row per customer, with a churn label).
    #[arg(long)]
    pub csv: PathBuf,
    /// The label column [default: the two-valued column named like churn,
    /// churned, exited, attrition, label or target].
    #[arg(long)]
    pub label: Option<String>,
    /// The label value meaning churned [default: the one that reads as yes:
    /// 1, yes, true, churned…].
    #[arg(long)]
    pub positive: Option<String>,
    /// Field separator: comma, tab, semicolon or pipe.
    #[arg(long, default_value = "comma")]
    pub delimiter: Delimiter,
    /// Most distinct values of a categorical column; text columns with more
    /// are left out.
    #[arg(long, default_value_t = 50)]
    pub max_categories: usize,
    /// Where to write the `[data.schema]` section (`-` for standard output).
    #[arg(long, default_value = "-")]
    pub out: PathBuf,
}

/// Why no schema was written.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// `--delimiter whitespace` is for orders exports only.
    #[error(
        "--delimiter whitespace is only for orders exports; customer tables use comma, tab, semicolon or pipe"
    )]
    Whitespace,
    /// The table could not be read or drafted.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The output could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// The output file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Drafts the schema and returns the `[data.schema]` section as TOML, the
/// draft's notes as comments above it.
pub fn draft(args: &SchemaArgs) -> Result<String, SchemaError> {
    let sep = args.delimiter.byte().ok_or(SchemaError::Whitespace)?;
    let file = std::fs::File::open(&args.csv).map_err(|source| DataError::Io {
        file: args.csv.clone(),
        source,
    })?;
    let opts = DraftOptions {
        label: args.label.clone(),
        positive: args.positive.clone(),
        max_categories: Some(args.max_categories),
    };
    let d = Schema::draft(file, &args.csv, sep, &opts)?;
    Ok(d.to_toml(&args.csv, Some("data.schema")))
}

/// Drafts the schema and writes it to `--out`.
pub fn run(args: &SchemaArgs) -> Result<(), SchemaError> {
    let text = draft(args)?;
    if args.out.as_os_str() == "-" {
        print!("{text}");
        return Ok(());
    }
    std::fs::write(&args.out, text).map_err(|source| SchemaError::Write {
        path: args.out.clone(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The drafted section pasted into a `merchant.toml` is the schema the
    /// agent then reads the table with.
    #[test]
    fn the_drafted_section_configures_an_agent_that_reads_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("customers.csv");
        std::fs::write(
            &csv,
            "cust_id;plan;visits;churned\nc1;gold;3;no\nc2;basic;0;yes\nc3;gold;;no\n",
        )
        .unwrap();
        let args = SchemaArgs {
            csv: csv.clone(),
            label: None,
            positive: None,
            delimiter: Delimiter::Semicolon,
            max_categories: 50,
            out: dir.path().join("schema.toml"),
        };
        run(&args).unwrap();
        let section = std::fs::read_to_string(&args.out).unwrap();
        let merchant = dir.path().join("merchant.toml");
        std::fs::write(
            &merchant,
            format!(
                "coordinator = \"http://127.0.0.1:1\"\nmerchant_id = \"m0\"\n\
                 [data]\nchurn_csv = \"{}\"\ndelimiter = \"semicolon\"\n{section}",
                csv.display()
            ),
        )
        .unwrap();
        let cfg = crate::config::AgentConfig::load_with_env(&merchant, |_| None).unwrap();
        let schema = cfg.data.schema.clone().unwrap();
        assert_eq!(schema.id.as_deref(), Some("cust_id"));
        assert_eq!(schema.numeric, ["visits"]);
        let ds = crate::data::CustomerTable::from_config(&cfg)
            .unwrap()
            .load()
            .unwrap();
        assert_eq!(ds.ids, ["c1", "c2", "c3"]);
        assert_eq!(ds.y.to_vec(), [0.0, 1.0, 0.0]);
        // visits, then plan one-hot (basic, gold); the blank visit reads 0.
        assert_eq!(ds.x.row(2).to_vec(), [0.0, 0.0, 1.0]);
        let e = draft(&SchemaArgs {
            delimiter: Delimiter::Whitespace,
            ..args
        })
        .unwrap_err();
        assert!(e.to_string().contains("only for orders exports"), "{e}");
    }
}
