#!/usr/bin/env bash
# The Debian packages behind static figure export (PNG/SVG through kaleido) and the browser
# tests: Chromium and the DejaVu fonts; and PostgreSQL's server, which the test of several
# `hm4sr tune` workers on one study starts in a temporary folder (it never runs as a service);
# and a C compiler, with which hm4sr_core.runtime builds the one-line library that lets MKL run
# its AVX-512 kernels on an AMD CPU (docs/performance.md). Installed when this runs as root with apt-get;
# otherwise one line says what is missing, how to get it and what is left out. Never fails
# the make, and never waits on a lock or a mirror for long: `apt-get update` has a timeout,
# and the install waits at most 120 s for dpkg's lock (the install itself is not cut short:
# killing dpkg halfway would leave the machine's package database broken).
#   HM4SR_SYSTEM_PACKAGES=skip   do not install anything (report only)
set -u
PACKAGES="chromium fonts-dejavu-core postgresql gcc"
have_browser() {  # the places hm4sr_core.static_export.find_browser looks
  { [ -n "${BROWSER_PATH:-}" ] && [ -x "${BROWSER_PATH}" ]; } && return 0
  for name in chromium chromium-browser google-chrome google-chrome-stable chrome; do
    command -v "$name" >/dev/null 2>&1 && return 0
  done
  [ -x /usr/bin/chromium ]
}
have_fonts() { [ -d /usr/share/fonts/truetype/dejavu ] || fc-list 2>/dev/null | grep -qi dejavu; }
have_postgres() { ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; }  # where tests/test_tune.py looks
have_cc() { command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1; }  # what hm4sr_core.runtime looks for
if have_browser && have_fonts && have_postgres && have_cc; then
  exit 0
fi
missing=""
left_out=""
if ! have_browser; then
  missing="Chromium"
  left_out="skipping what needs it: PNG/SVG figure export (the HTML and plotly JSON figures are still written) and the browser tests"
elif ! have_fonts; then
  missing="the DejaVu fonts"
  left_out="nothing is skipped, but figure text may fall back to other fonts"
fi
if ! have_postgres; then
  missing="${missing:+$missing and }PostgreSQL"
  left_out="${left_out:+$left_out; }skipping the PostgreSQL test of hm4sr tune"
fi
if ! have_cc; then
  missing="${missing:+$missing and }a C compiler"
  left_out="${left_out:+$left_out; }on an AMD CPU MKL keeps its generic kernels (slower training; the tests that build the library skip)"
fi
skip_line() {
  echo "system packages: $missing missing ($1); $left_out. To get them: apt-get install -y $PACKAGES" \
       "(as root), or set BROWSER_PATH to a Chrome/Chromium executable."
}
if [ "${HM4SR_SYSTEM_PACKAGES:-}" = "skip" ]; then
  skip_line "HM4SR_SYSTEM_PACKAGES=skip"
  exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  skip_line "installing needs root and apt-get"
  exit 0
fi
echo "system packages: installing Debian's $PACKAGES for static figure export, the browser tests, the PostgreSQL test of hm4sr tune and MKL's kernels on AMD" \
     "(apt-get install -y $PACKAGES; a minute or two the first time)"
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
if timeout 300 apt-get update -qq >"$log" 2>&1 \
   && apt-get install -y -qq -o DPkg::Lock::Timeout=120 $PACKAGES >>"$log" 2>&1 && have_browser && have_fonts \
   && have_postgres && have_cc; then
  rm -f "$log"
  exit 0
fi
tail -n 5 "$log" | sed 's/^/  apt-get: /'
rm -f "$log"
skip_line "apt-get could not install them, see its last lines above"
exit 0
