//! Draw the soak's CSV (written by `cargo bench --bench soak`) as a PNG of four panels over
//! time: server RSS, open file descriptors, allocations and rooms, and relay loss. A separate
//! crate so that the plotting stack never enters the server's build.
//!
//! `soak-plot IN.csv OUT.png [FONT.ttf]` (the font defaults to Debian's DejaVu Sans).

use plotters::prelude::*;
use std::error::Error;

/// One CSV column by header name, as numbers.
fn column(rows: &[Vec<f64>], header: &[String], name: &str) -> Result<Vec<f64>, String> {
    let i = header
        .iter()
        .position(|h| h == name)
        .ok_or_else(|| format!("no column {name}"))?;
    Ok(rows
        .iter()
        .map(|r| r.get(i).copied().unwrap_or(0.0))
        .collect())
}

type Series<'a> = (&'a str, Vec<f64>, RGBColor);

fn panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    title: &str,
    t: &[f64],
    series: &[Series<'_>],
) -> Result<(), Box<dyn Error>> {
    let x_max = t.last().copied().unwrap_or(1.0).max(1.0);
    let y_max = series
        .iter()
        .flat_map(|s| s.1.iter().copied())
        .fold(0.0f64, f64::max)
        * 1.15;
    // An all-zero series (no loss) still gets a readable axis.
    let y_max = y_max.max(1.0);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("minutes")
        .x_label_formatter(&|x| format!("{:.0}", x))
        .y_label_formatter(&|y| {
            if y_max >= 100.0 {
                format!("{y:.0}")
            } else {
                format!("{y:.2}")
            }
        })
        .draw()?;
    for (name, ys, color) in series {
        let c = *color;
        chart
            .draw_series(LineSeries::new(
                t.iter().copied().zip(ys.iter().copied()),
                c.stroke_width(2),
            ))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::MiddleRight)
        .draw()?;
    Ok(())
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        return Err("usage: soak-plot IN.csv OUT.png [FONT.ttf]".into());
    }
    let font = args
        .get(3)
        .cloned()
        .unwrap_or_else(|| "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf".into());
    let bytes: &'static [u8] = Box::leak(
        std::fs::read(&font)
            .map_err(|e| format!("{font}: {e} (install fonts-dejavu-core)"))?
            .into_boxed_slice(),
    );
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| format!("{font}: not a font"))?;

    let text = std::fs::read_to_string(&args[1])?;
    let mut lines = text.lines();
    let header: Vec<String> = lines
        .next()
        .ok_or("empty CSV")?
        .split(',')
        .map(String::from)
        .collect();
    let rows: Vec<Vec<f64>> = lines
        .map(|l| l.split(',').map(|v| v.parse().unwrap_or(0.0)).collect())
        .collect();
    let t: Vec<f64> = column(&rows, &header, "elapsed_s")?
        .into_iter()
        .map(|s| s / 60.0)
        .collect();
    let rss: Vec<f64> = column(&rows, &header, "rss_kib")?
        .into_iter()
        .map(|k| k / 1024.0)
        .collect();

    let root = BitMapBackend::new(&args[2], (1200, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((2, 2));
    panel(&areas[0], "server RSS (MiB)", &t, &[("RSS", rss, RED)])?;
    panel(
        &areas[1],
        "open file descriptors",
        &t,
        &[("fds", column(&rows, &header, "fds")?, BLUE)],
    )?;
    panel(
        &areas[2],
        "allocations and rooms",
        &t,
        &[
            ("allocations", column(&rows, &header, "allocations")?, GREEN),
            ("rooms", column(&rows, &header, "rooms")?, MAGENTA),
            (
                "WebSockets / 10",
                column(&rows, &header, "ws_open")?
                    .into_iter()
                    .map(|v| v / 10.0)
                    .collect(),
                CYAN,
            ),
        ],
    )?;
    panel(
        &areas[3],
        "relay loss per interval (%)",
        &t,
        &[("loss", column(&rows, &header, "loss_pct")?, BLACK)],
    )?;
    root.present()?;
    Ok(())
}
