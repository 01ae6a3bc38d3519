// What every example does around its training loop: command-line options, curves kept as a
// table and written as CSV, a terminal plot, a PNG through gnuplot when it is installed, and the
// direction-of-learning checks that make an example exit non-zero when learning went wrong.
#pragma once
#include <prefloss/prefloss.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include <unistd.h>

namespace examples {

/// printf into a std::string.
#if defined(__GNUC__)
__attribute__((format(printf, 1, 2)))
#endif
inline std::string
fmt(const char* f, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, f);
  std::vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

// ---- command line ---------------------------------------------------------------------------

struct Args {
  std::string name;        ///< the example's name: outputs are out/<name>.csv, .png, .gp
  std::string out = ".";   ///< --out DIR
  long steps = 0;          ///< --steps N (or the example's default, or its quick default)
  bool quick = false;      ///< --quick: the short smoke-test run
  std::uint64_t seed = 1;  ///< --seed S

  std::string path(const std::string& ext) const { return (std::filesystem::path(out) / (name + ext)).string(); }
};

/// Parses --out DIR, --steps N, --quick, --seed S, --help. Creates DIR. Exits 2 on bad input.
inline Args parse_args(int argc, char** argv, const std::string& name, const std::string& what, long full_steps,
                       long quick_steps, const char* steps_are = "training steps") {
  Args a;
  a.name = name;
  long steps = -1;
  const auto usage = [&](FILE* f) {
    std::fprintf(f,
                 "%s: %s\n\nusage: %s [--out DIR] [--steps N | --quick] [--seed S]\n"
                 "  --out DIR   where %s.csv / .png / .gp go (default: the current directory)\n"
                 "  --steps N   %s (default %ld)\n"
                 "  --quick     short run for smoke tests (%ld %s)\n"
                 "  --seed S    seed of the data and the training run (default 1)\n",
                 name.c_str(), what.c_str(), name.c_str(), name.c_str(), steps_are, full_steps, quick_steps, steps_are);
  };
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s: option %s needs a value\n", name.c_str(), arg.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    try {
      if (arg == "--out") {
        a.out = value();
      } else if (arg == "--steps") {
        steps = std::stol(value());
        if (steps <= 0) throw std::invalid_argument("steps");
      } else if (arg == "--quick") {
        a.quick = true;
      } else if (arg == "--seed") {
        a.seed = std::stoull(value());
      } else if (arg == "--help" || arg == "-h") {
        usage(stdout);
        std::exit(0);
      } else {
        std::fprintf(stderr, "%s: unknown option '%s'\n\n", name.c_str(), arg.c_str());
        usage(stderr);
        std::exit(2);
      }
    } catch (const std::exception&) {
      std::fprintf(stderr, "%s: bad value for %s\n", name.c_str(), arg.c_str());
      std::exit(2);
    }
  }
  a.steps = steps > 0 ? steps : (a.quick ? quick_steps : full_steps);
  std::error_code ec;
  std::filesystem::create_directories(a.out, ec);
  if (ec) {
    std::fprintf(stderr, "%s: cannot create output directory '%s': %s\n", name.c_str(), a.out.c_str(),
                 ec.message().c_str());
    std::exit(2);
  }
  return a;
}

// ---- curves as a table ----------------------------------------------------------------------

/// Named columns of doubles, one row per step (or per point).
class Table {
 public:
  explicit Table(std::vector<std::string> columns) : names_(std::move(columns)), cols_(names_.size()) {}

  void add(const std::vector<double>& row) {
    if (row.size() != names_.size()) throw std::logic_error("Table::add: row has the wrong number of values");
    for (std::size_t c = 0; c < row.size(); ++c) cols_[c].push_back(row[c]);
  }

  const std::vector<double>& operator[](const std::string& name) const {
    for (std::size_t c = 0; c < names_.size(); ++c)
      if (names_[c] == name) return cols_[c];
    throw std::logic_error("Table: no column '" + name + "'");
  }
  std::size_t rows() const { return cols_.empty() ? 0 : cols_[0].size(); }

  /// Writes a header line and one line per row, comma-separated; NaN (no value) is an empty field.
  void write_csv(const std::string& path) const {
    std::ofstream f(path);
    if (!f) throw std::runtime_error("cannot write " + path);
    for (std::size_t c = 0; c < names_.size(); ++c) f << (c ? "," : "") << names_[c];
    f << '\n';
    for (std::size_t r = 0; r < rows(); ++r) {
      for (std::size_t c = 0; c < names_.size(); ++c)
        f << (c ? "," : "") << (std::isnan(cols_[c][r]) ? std::string() : fmt("%.6g", cols_[c][r]));
      f << '\n';
    }
  }

 private:
  std::vector<std::string> names_;
  std::vector<std::vector<double>> cols_;
};

/// Moving average over the last `window` values (for noisy per-batch curves).
inline std::vector<double> smooth(const std::vector<double>& y, std::size_t window) {
  std::vector<double> out(y.size());
  double s = 0;
  for (std::size_t i = 0; i < y.size(); ++i) {
    s += y[i];
    if (i >= window) s -= y[i - window];
    out[i] = s / static_cast<double>(std::min(i + 1, window));
  }
  return out;
}

// ---- terminal plot --------------------------------------------------------------------------

struct PlotSeries {
  std::string label;
  std::vector<double> x, y;
  char glyph = '*';
  bool points = false;  ///< true: a glyph at each point; false: connected line
};

/// @brief A character plot of several series, at most `width` columns wide: y labels on the
/// left, a legend below. Series are drawn in order, later ones on top.
struct AsciiPlot {
  AsciiPlot(std::string title_, std::string xlabel_) : title(std::move(title_)), xlabel(std::move(xlabel_)) {}
  std::string title, xlabel;
  int width = 100, height = 12;
  bool logy = false;  ///< logarithmic y axis (non-positive values are not drawn)
  std::vector<PlotSeries> series;
  double ymin = std::numeric_limits<double>::quiet_NaN();  ///< fixed axis limits (NaN: from the data)
  double ymax = std::numeric_limits<double>::quiet_NaN();

  AsciiPlot& add(std::string label, std::vector<double> x, std::vector<double> y, char glyph, bool points = false) {
    series.push_back(PlotSeries{std::move(label), std::move(x), std::move(y), glyph, points});
    return *this;
  }

  /// A horizontal reference line over the x range of the other series.
  AsciiPlot& hline(std::string label, double y, char glyph) {
    series.push_back(PlotSeries{std::move(label), {}, {y}, glyph, false});
    return *this;
  }

  std::string render() const {
    constexpr int gutter = 11;  // "%9.4g" + ' ' + '|'
    const int pw = std::max(10, width - gutter);
    // y is mapped through ty (log10 on a log axis); the labels show the untransformed values.
    const auto ty = [&](double y) {
      return logy ? (y > 0 ? std::log10(y) : std::numeric_limits<double>::quiet_NaN()) : y;
    };
    const auto uy = [&](double v) { return logy ? std::pow(10.0, v) : v; };
    double x0 = std::numeric_limits<double>::infinity(), x1 = -x0, y0 = x0, y1 = -x0;
    for (const auto& s : series) {
      for (double v : s.x) x0 = std::min(x0, v), x1 = std::max(x1, v);
      for (double v : s.y)
        if (std::isfinite(ty(v))) y0 = std::min(y0, ty(v)), y1 = std::max(y1, ty(v));
    }
    if (!std::isfinite(x0)) x0 = 0, x1 = 1;
    if (x1 == x0) x1 = x0 + 1;
    if (!std::isfinite(y0)) y0 = 0, y1 = 1;
    if (y1 - y0 < 1e-12 * std::max(1.0, std::abs(y0))) y0 -= 0.5, y1 += 0.5;
    const double pad = 0.03 * (y1 - y0);
    y0 -= pad, y1 += pad;
    if (std::isfinite(ty(ymin))) y0 = ty(ymin);
    if (std::isfinite(ty(ymax))) y1 = ty(ymax);

    std::vector<std::string> grid(static_cast<std::size_t>(height), std::string(static_cast<std::size_t>(pw), ' '));
    const auto col = [&](double x) { return static_cast<int>(std::lround((x - x0) / (x1 - x0) * (pw - 1))); };
    const auto row = [&](double y) { return static_cast<int>(std::lround((y1 - y) / (y1 - y0) * (height - 1))); };
    const auto put = [&](int c, int r, char g) {
      if (c >= 0 && c < pw && r >= 0 && r < height) grid[static_cast<std::size_t>(r)][static_cast<std::size_t>(c)] = g;
    };
    for (const auto& s : series) {
      if (s.x.empty()) {  // horizontal line
        if (!s.y.empty() && std::isfinite(ty(s.y[0])))
          for (int c = 0; c < pw; c += 2) put(c, row(ty(s.y[0])), s.glyph);
        continue;
      }
      int pc = 0, pr = 0;
      bool have = false;
      for (std::size_t i = 0; i < s.x.size() && i < s.y.size(); ++i) {
        if (!std::isfinite(ty(s.y[i]))) {
          have = false;
          continue;
        }
        const int c = col(s.x[i]), r = row(ty(s.y[i]));
        if (s.points || !have) {
          put(c, r, s.glyph);
        } else {  // connect (pc, pr) -> (c, r)
          const int n = std::max(std::abs(c - pc), std::abs(r - pr));
          for (int k = 1; k <= n; ++k)
            put(pc + static_cast<int>(std::lround(double(c - pc) * k / n)),
                pr + static_cast<int>(std::lround(double(r - pr) * k / n)), s.glyph);
        }
        pc = c, pr = r, have = true;
      }
    }

    std::string out;
    if (!title.empty()) out += title + "\n";
    for (int r = 0; r < height; ++r) {
      std::string label(gutter - 1, ' ');
      if (r == 0 || r == height - 1 || r == (height - 1) / 2) {
        const double y = y1 - (y1 - y0) * r / (height - 1);
        label = fmt("%9.4g ", !logy && std::abs(y) < 1e-12 * (y1 - y0) ? 0.0 : uy(y));
      }
      out += label + "|" + grid[static_cast<std::size_t>(r)] + "\n";
    }
    out += std::string(gutter - 1, ' ') + "+" + std::string(static_cast<std::size_t>(pw), '-') + "\n";
    // x ticks: left, middle (with the axis label), right
    std::string ticks(static_cast<std::size_t>(gutter + pw), ' ');
    const auto place = [&](std::size_t at, const std::string& s) {
      for (std::size_t k = 0; k < s.size() && at + k < ticks.size(); ++k) ticks[at + k] = s[k];
    };
    const std::string l = fmt("%.4g", x0), m = fmt("%.4g", 0.5 * (x0 + x1)), rr = fmt("%.4g", x1);
    place(gutter, l);
    place(static_cast<std::size_t>(gutter + pw / 2) - m.size() / 2, m);
    place(static_cast<std::size_t>(gutter + pw) - rr.size(), rr);
    if (!xlabel.empty()) place(static_cast<std::size_t>(gutter + pw / 4) - xlabel.size() / 2, xlabel);
    while (!ticks.empty() && ticks.back() == ' ') ticks.pop_back();
    out += ticks + "\n";
    // legend, wrapped
    std::string line = std::string(gutter - 1, ' ') + " ";
    for (const auto& s : series) {
      const std::string item = std::string(1, s.glyph) + " " + s.label + "   ";
      if (line.size() + item.size() - 3 > static_cast<std::size_t>(gutter + pw) &&
          line.size() > static_cast<std::size_t>(gutter)) {
        while (line.back() == ' ') line.pop_back();
        out += line + "\n";
        line = std::string(gutter, ' ');
      }
      line += item;
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    out += line + "\n";
    return out;
  }

  void print() const { std::printf("%s\n", render().c_str()); }
};

// ---- PNG through gnuplot --------------------------------------------------------------------

/// One curve of a gnuplot panel: columns x and y of a CSV file (by header name).
struct GpCurve {
  std::string file, x, y, title;          ///< an empty title leaves the curve out of the key
  std::string style = "with lines lw 2";  ///< e.g. "with linespoints pt 7 lc rgb '#1f77b4'"
  /// A third `using` entry, written as it is: "'w'" for a column (a heatmap "with image"), or an
  /// expression such as "(sprintf('%.2f', column('w')))" for "with labels". Empty: x:y only.
  std::string z;
};

struct GpPanel {
  GpPanel(std::string title_, std::string xlabel_, std::string ylabel_)
      : title(std::move(title_)), xlabel(std::move(xlabel_)), ylabel(std::move(ylabel_)) {}
  GpPanel& curve(std::string file, std::string x, std::string y, std::string curve_title, std::string style) {
    curves.push_back(
        GpCurve{std::move(file), std::move(x), std::move(y), std::move(curve_title), std::move(style), {}});
    return *this;
  }
  /// A curve with a third column or expression (see GpCurve::z).
  GpPanel& curve3(std::string file, std::string x, std::string y, std::string z, std::string style) {
    curves.push_back(GpCurve{std::move(file), std::move(x), std::move(y), "", std::move(style), std::move(z)});
    return *this;
  }

  std::string title, xlabel, ylabel;
  std::vector<GpCurve> curves;
  bool logy = false;
  std::string key = "top right";  ///< gnuplot 'set key' position, or "off"
  std::string extra;              ///< more gnuplot commands before the plot
};

struct GpFigure {
  GpFigure(std::string title_, int rows_, int cols_, int width_, int height_)
      : title(std::move(title_)), rows(rows_), cols(cols_), width(width_), height(height_) {}
  std::string title;
  int rows, cols, width, height;
  std::vector<GpPanel> panels;
};

/// Is an executable `prog` on PATH?
inline bool on_path(const std::string& prog) {
  const char* path = std::getenv("PATH");
  if (!path) return false;
  std::string p = path;
  std::size_t start = 0;
  while (start <= p.size()) {
    const std::size_t end = std::min(p.find(':', start), p.size());
    const std::string dir = p.substr(start, end - start);
    const std::string cand = (dir.empty() ? std::string(".") : dir) + "/" + prog;
    if (::access(cand.c_str(), X_OK) == 0) return true;
    start = end + 1;
  }
  return false;
}

/// gnuplot's single-quoted string ('' is a quote).
inline std::string gp_quote(const std::string& s) {
  std::string o = "'";
  for (char c : s) o += c == '\'' ? std::string("''") : std::string(1, c);
  return o + "'";
}

/// @brief Writes the gnuplot script `script` for the figure and, if gnuplot is on PATH, runs
/// it to make `png` (pngcairo). Returns true when the PNG was written; otherwise says why.
inline bool write_png(const GpFigure& fig, const std::string& png, const std::string& script) {
  {
    std::ofstream f(script);
    if (!f) throw std::runtime_error("cannot write " + script);
    f << "# Made by the prefloss examples; rerun with: gnuplot " << script << "\n";
    f << "set terminal pngcairo size " << fig.width << "," << fig.height << " font 'sans,10' noenhanced\n";
    f << "set output " << gp_quote(png) << "\n";
    f << "set datafile separator ','\nset datafile columnheaders\n";
    f << "set grid lc rgb '#dddddd'\nset key samplen 2 spacing 1 font ',9'\nset autoscale xfix\n";
    f << "set multiplot layout " << fig.rows << "," << fig.cols << " title " << gp_quote(fig.title) << " font ',13'\n";
    for (const auto& p : fig.panels) {
      f << "set title " << gp_quote(p.title) << "\nset xlabel " << gp_quote(p.xlabel) << "\nset ylabel "
        << gp_quote(p.ylabel) << "\n";
      f << (p.logy ? "set logscale y\n" : "unset logscale y\n");
      f << (p.key == "off" ? std::string("unset key\n") : "set key " + p.key + "\n");
      f << p.extra << "\n";
      f << "plot ";
      for (std::size_t i = 0; i < p.curves.size(); ++i) {
        const auto& c = p.curves[i];
        f << (i ? ", \\\n     " : "") << gp_quote(c.file) << " using " << gp_quote(c.x) << ":" << gp_quote(c.y)
          << (c.z.empty() ? std::string() : ":" + c.z) << " " << c.style
          << (c.title.empty() ? std::string(" notitle") : " title " + gp_quote(c.title));
      }
      f << "\n";
      // What a panel's `extra` may have set must not reach the next panel.
      f << "unset label\nunset arrow\nset autoscale\nset autoscale xfix\nset xrange [*:*] noreverse\n"
           "set yrange [*:*] noreverse\nset xtics autofreq norotate font ''\nset ytics autofreq font ''\n"
           "set grid lc rgb '#dddddd'\n";
    }
    f << "unset multiplot\n";
  }
  if (!on_path("gnuplot")) {
    std::printf("gnuplot is not installed: no PNG (apt-get install gnuplot-nox, then: gnuplot %s)\n", script.c_str());
    return false;
  }
  const std::string cmd = "gnuplot " + gp_quote(script) + " 2>&1";
  const int rc = std::system(cmd.c_str());
  if (rc != 0) {
    std::printf("gnuplot failed (exit %d): no PNG\n", rc);
    return false;
  }
  std::printf("wrote %s\n", png.c_str());
  return true;
}

// ---- checks and timing ----------------------------------------------------------------------

/// Direction-of-learning checks, printed as PASS/FAIL lines; finish() gives the exit code.
class Checks {
 public:
  void expect(bool ok, const std::string& what) {
    std::printf("%s: %s\n", ok ? "PASS" : "FAIL", what.c_str());
    failures_ += ok ? 0 : 1;
    ++count_;
  }
  int finish(const std::string& name) const {
    if (failures_ == 0)
      std::printf("%s: all %d checks passed\n", name.c_str(), count_);
    else
      std::printf("%s: %d of %d checks FAILED\n", name.c_str(), failures_, count_);
    return failures_ == 0 ? 0 : 1;
  }

 private:
  int failures_ = 0, count_ = 0;
};

class Stopwatch {
 public:
  double seconds() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count(); }

 private:
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
};

}  // namespace examples
