#!/usr/bin/env bash
# The Debian packages behind static figure export (PNG/SVG through kaleido) and the browser
# tests: Chromium and the DejaVu fonts. Installed when this runs as root with apt-get;
# otherwise one line says what is missing, how to get it and what is left out. Never fails
# and never waits for long: every apt-get call has a timeout.
#   HM4SR_SYSTEM_PACKAGES=skip   do not install anything (report only)
set -u
PACKAGES="chromium fonts-dejavu-core"
have_browser() {
  { [ -n "${BROWSER_PATH:-}" ] && [ -x "${BROWSER_PATH}" ]; } || command -v chromium >/dev/null 2>&1 \
    || command -v chromium-browser >/dev/null 2>&1 || command -v google-chrome >/dev/null 2>&1 \
    || [ -x /usr/bin/chromium ]
}
have_fonts() { fc-list 2>/dev/null | grep -qi dejavu || [ -d /usr/share/fonts/truetype/dejavu ]; }
if have_browser && have_fonts; then
  exit 0
fi
skip_line() {
  echo "system packages: $1; skipping what needs them: PNG/SVG figure export (the HTML and plotly JSON" \
       "figures are still written) and the browser tests. To get them: apt-get install -y $PACKAGES" \
       "(as root), or set BROWSER_PATH to a Chrome/Chromium executable."
}
if [ "${HM4SR_SYSTEM_PACKAGES:-}" = "skip" ]; then
  skip_line "chromium or the DejaVu fonts missing and HM4SR_SYSTEM_PACKAGES=skip"
  exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  skip_line "chromium or the DejaVu fonts missing, and installing needs root and apt-get"
  exit 0
fi
echo "system packages: installing Debian's $PACKAGES for static figure export and the browser tests" \
     "(apt-get install -y $PACKAGES; a few minutes the first time)"
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
if timeout 300 apt-get update -qq >"$log" 2>&1 \
   && timeout 900 apt-get install -y -qq $PACKAGES >>"$log" 2>&1 && have_browser; then
  rm -f "$log"
  exit 0
fi
tail -n 5 "$log" | sed 's/^/  apt-get: /'
rm -f "$log"
skip_line "apt-get could not install $PACKAGES (see its last lines above)"
exit 0
