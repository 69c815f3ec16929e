//! `droppos-pipeline stats OUT [--json]`: rows per class, image-size and bytes-per-image
//! distributions and the skipped summary, computed with polars over the shards' columns.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use droppos_shards::verify::row_stats;
use droppos_shards::Manifest;
use polars::prelude::*;
use serde_json::{json, Value};

/// What the command does (its one-line help in both binaries).
pub const ABOUT: &str =
    "Rows per class, image-size and bytes-per-image distributions, skipped summary";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Dataset folder (holding manifest.json).
    dir: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn f64_column(df: &DataFrame, name: &str) -> Result<Vec<Option<f64>>> {
    let c = df
        .column(name)?
        .cast(&DataType::Float64)?
        .as_materialized_series()
        .clone();
    let ca = c.f64()?;
    Ok((0..ca.len()).map(|i| ca.get(i)).collect())
}

/// min / p5 / median / p95 / max / mean of a numeric column (percentiles nearest-rank; the
/// median the usual one, the mean of the two middle values for an even count).
fn distribution(df: &DataFrame, name: &str) -> Result<Value> {
    let c = || col(name).cast(DataType::Float64);
    let q = |p: f64, alias: &str| c().quantile(lit(p), QuantileMethod::Nearest).alias(alias);
    let out = df
        .clone()
        .lazy()
        .select([
            c().min().alias("min"),
            q(0.05, "p5"),
            c().median().alias("median"),
            q(0.95, "p95"),
            c().max().alias("max"),
            c().mean().alias("mean"),
        ])
        .collect()?;
    let mut m = serde_json::Map::new();
    for k in ["min", "p5", "median", "p95", "max", "mean"] {
        let v = f64_column(&out, k)?.first().copied().flatten();
        m.insert(k.into(), v.map(Value::from).unwrap_or(Value::Null));
    }
    Ok(Value::Object(m))
}

pub fn run(args: Args) -> Result<()> {
    let m = Manifest::load(&args.dir)
        .with_context(|| format!("reading the manifest in {}", args.dir.display()))?;
    let s = row_stats(&m).with_context(|| format!("reading shards of {}", args.dir.display()))?;
    let n = s.width.len();
    let df = DataFrame::new(
        n,
        vec![
            Column::new("shard".into(), s.shard),
            Column::new("label".into(), s.label),
            Column::new("annotations".into(), s.annotations),
            Column::new("width".into(), s.width),
            Column::new("height".into(), s.height),
            Column::new("bytes".into(), s.image_bytes),
        ],
    )?;
    let df = df
        .lazy()
        .with_column((col("width") * col("height")).alias("pixels"))
        .with_column(
            (col("width").cast(DataType::Float64) / col("height").cast(DataType::Float64))
                .alias("aspect"),
        )
        .collect()?;

    // Rows per class: ImageNet by label; COCO and ADE20K the rows holding the class, with its
    // annotations (COCO) or patch-layout cells (ADE20K) summed.
    let amount = match m.dataset {
        droppos_shards::Dataset::Coco => Some("annotations"),
        droppos_shards::Dataset::Ade20k => Some("patches"),
        droppos_shards::Dataset::Imagenet => None,
    };
    let g = match amount {
        Some(_) => {
            let p = &s.present;
            DataFrame::new(
                p.row.len(),
                vec![
                    Column::new("row".into(), &p.row),
                    Column::new("class".into(), &p.class),
                    Column::new("count".into(), &p.count),
                ],
            )?
            .lazy()
            .group_by([col("class")])
            .agg([
                col("row").n_unique().alias("rows"),
                col("count").cast(DataType::UInt64).sum().alias("amount"),
            ])
        }
        None => df
            .clone()
            .lazy()
            .group_by([col("label").alias("class")])
            .agg([len().alias("rows")]),
    }
    .sort(["class"], Default::default())
    .collect()?;
    let classes = f64_column(&g, "class")?;
    let rows = f64_column(&g, "rows")?;
    let sums = match amount {
        Some(_) => f64_column(&g, "amount")?,
        None => vec![None; classes.len()],
    };
    let mut per_class = Vec::new();
    for ((c, r), a) in classes.into_iter().zip(rows).zip(sums) {
        let c = c.unwrap_or(-1.0) as i64;
        let class = m.classes.iter().find(|e| e.index as i64 == c);
        let mut entry = json!({
            "index": c,
            "id": class.map(|e| e.id.clone()),
            "name": class.map(|e| e.name.clone()),
            "rows": r.unwrap_or(0.0) as u64,
        });
        if let Some(amount) = amount {
            entry[amount] = json!(a.unwrap_or(0.0) as u64);
        }
        per_class.push(entry);
    }
    let annotations = if m.dataset == droppos_shards::Dataset::Coco {
        let total: f64 = f64_column(&df, "annotations")?.iter().flatten().sum();
        let empty = f64_column(&df, "annotations")?
            .iter()
            .filter(|v| **v == Some(0.0))
            .count();
        json!({"total": total as u64, "images_without": empty, "per_image": distribution(&df, "annotations")?})
    } else {
        Value::Null
    };
    let mut skipped: BTreeMap<String, usize> = BTreeMap::new();
    for e in &m.skipped {
        let kind = e.reason.split(':').next().unwrap_or(&e.reason).to_string();
        *skipped.entry(kind).or_default() += 1;
    }
    let report = json!({
        "dataset": m.dataset.name(),
        "split": m.split,
        "rows": m.num_rows,
        "shards": m.shards.len(),
        "shard_bytes": m.shards.iter().map(|s| s.bytes).sum::<u64>(),
        "classes": m.classes.len(),
        "rows_per_class": per_class,
        "width": distribution(&df, "width")?,
        "height": distribution(&df, "height")?,
        "aspect": distribution(&df, "aspect")?,
        "bytes_per_image": distribution(&df, "bytes")?,
        "annotations": annotations,
        "skipped": {"total": m.skipped.len(), "by_reason": skipped},
        "conversions": m.conversions.len(),
    });
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "{} {}: {} rows in {} shards ({:.1} MB), {} classes",
        m.dataset,
        m.split,
        m.num_rows,
        m.shards.len(),
        report["shard_bytes"].as_u64().unwrap_or(0) as f64 / 1e6,
        m.classes.len()
    );
    let fmt_with = |v: &Value, decimals: usize| -> String {
        ["min", "p5", "median", "p95", "max", "mean"]
            .iter()
            .map(|k| {
                format!(
                    "{k} {}",
                    v[k].as_f64()
                        .map_or("-".into(), |x| format!("{x:.decimals$}"))
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let fmt = |v: &Value| fmt_with(v, 1);
    println!("width:           {}", fmt(&report["width"]));
    println!("height:          {}", fmt(&report["height"]));
    println!("aspect (w/h):    {}", fmt_with(&report["aspect"], 2));
    println!("bytes per image: {}", fmt(&report["bytes_per_image"]));
    if !per_class.is_empty() {
        let counts: Vec<u64> = per_class
            .iter()
            .map(|c| c["rows"].as_u64().unwrap_or(0))
            .collect();
        println!(
            "rows per class:  {} classes present, min {}, max {} rows",
            counts.len(),
            counts.iter().min().unwrap_or(&0),
            counts.iter().max().unwrap_or(&0)
        );
        let header = amount.map_or(String::new(), |a| format!(" {a:>11}"));
        println!("  {:>5} {:<12} {:>6}{header}  name", "index", "id", "rows");
        for c in per_class.iter().take(20) {
            // serde_json's Display ignores widths: format the numbers themselves.
            let num = |k: &str| c[k].as_i64().map_or("?".into(), |v| v.to_string());
            let extra = amount.map_or(String::new(), |a| format!(" {:>11}", num(a)));
            println!(
                "  {:>5} {:<12} {:>6}{extra}  {}",
                num("index"),
                c["id"].as_str().unwrap_or("?"),
                num("rows"),
                c["name"].as_str().unwrap_or("")
            );
        }
        if per_class.len() > 20 {
            println!("  ... ({} more; --json lists all)", per_class.len() - 20);
        }
    }
    if !annotations.is_null() {
        println!(
            "annotations:     {} total, {} images without, per image: {}",
            annotations["total"],
            annotations["images_without"],
            fmt(&annotations["per_image"])
        );
    }
    println!("skipped:         {}", m.skipped.len());
    for (k, v) in &skipped {
        println!("  {v:>6}  {k}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        let df = df!("w" => [683i32, 400]).unwrap();
        let d = distribution(&df, "w").unwrap();
        assert_eq!(d["median"], 541.5);
        assert_eq!(
            (d["min"].clone(), d["max"].clone()),
            (400.0.into(), 683.0.into())
        );
        let df = df!("w" => [3i32, 1, 2]).unwrap();
        assert_eq!(distribution(&df, "w").unwrap()["median"], 2.0);
    }
}
