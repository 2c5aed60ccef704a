//! Rows as a plain-text table (comfy-table) or CSV (the csv crate), from one
//! list of columns: each column is named, sized and valued once, and both
//! renderers read the same rows.

use anyhow::Result;
use comfy_table::{presets, CellAlignment, ColumnConstraint, Table, Width};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// One column of `T` rows.
pub struct Column<T> {
    /// Header in tables; `None` leaves the column out of tables.
    pub table: Option<&'static str>,
    /// Header in CSV; `None` leaves the column out of CSV.
    pub csv: Option<&'static str>,
    /// Minimum width in tables: values stay aligned while they fit, and a
    /// longer one widens its column.
    pub width: u16,
    /// Spaces before the column in tables (none before the first).
    pub gap: u16,
    pub align: Align,
    pub value: fn(&T) -> String,
}

/// A borderless table: a header line (with `header`), then one line per row,
/// trailing spaces trimmed.
pub fn table<'a, T: 'a>(
    columns: &[Column<T>],
    header: bool,
    rows: impl IntoIterator<Item = &'a T>,
) -> String {
    let shown: Vec<&Column<T>> = columns.iter().filter(|c| c.table.is_some()).collect();
    let mut t = Table::new();
    t.load_style(presets::NOTHING);
    if header {
        t.set_header(shown.iter().map(|c| c.table.unwrap_or_default()));
    }
    for row in rows {
        t.add_row(shown.iter().map(|c| (c.value)(row)));
    }
    for (column, spec) in t.column_iter_mut().zip(&shown) {
        column.set_padding((spec.gap, 0));
        column.set_constraint(ColumnConstraint::LowerBoundary(Width::Fixed(
            spec.width + spec.gap,
        )));
        column.set_cell_alignment(match spec.align {
            Align::Left => CellAlignment::Left,
            Align::Right => CellAlignment::Right,
        });
    }
    t.trim_fmt()
}

/// RFC 4180 CSV with a header line; values holding commas, quotes or line
/// breaks are quoted.
pub fn csv<'a, T: 'a>(
    columns: &[Column<T>],
    rows: impl IntoIterator<Item = &'a T>,
) -> Result<String> {
    let shown: Vec<&Column<T>> = columns.iter().filter(|c| c.csv.is_some()).collect();
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(shown.iter().map(|c| c.csv.unwrap_or_default()))?;
    for row in rows {
        w.write_record(shown.iter().map(|c| (c.value)(row)))?;
    }
    Ok(String::from_utf8(w.into_inner()?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Item {
        name: &'static str,
        n: u64,
    }

    const COLUMNS: [Column<Item>; 3] = [
        Column {
            table: Some("name"),
            csv: Some("name"),
            width: 6,
            gap: 0,
            align: Align::Left,
            value: |i| i.name.to_string(),
        },
        Column {
            table: Some("n"),
            csv: Some("count"),
            width: 4,
            gap: 1,
            align: Align::Right,
            value: |i| i.n.to_string(),
        },
        Column {
            table: None,
            csv: Some("double"),
            width: 0,
            gap: 1,
            align: Align::Right,
            value: |i| (i.n * 2).to_string(),
        },
    ];

    #[test]
    fn tables_pad_to_the_minimum_width_and_widen_for_longer_values() {
        let rows = [
            Item { name: "a", n: 1 },
            Item {
                name: "a longer one",
                n: 12345,
            },
        ];
        assert_eq!(
            table(&COLUMNS, true, &rows),
            "name             n\na                1\na longer one 12345"
        );
        assert_eq!(table(&COLUMNS, false, &rows[..1]), "a         1");
        assert_eq!(table(&COLUMNS, true, []), "name      n");
    }

    #[test]
    fn csv_quotes_commas_quotes_and_line_breaks() {
        let rows = [
            Item {
                name: "plain",
                n: 1,
            },
            Item {
                name: "a,b \"c\"\nd",
                n: 2,
            },
        ];
        assert_eq!(
            csv(&COLUMNS, &rows).unwrap(),
            "name,count,double\nplain,1,2\n\"a,b \"\"c\"\"\nd\",2,4\n"
        );
    }
}
