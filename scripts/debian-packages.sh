# Sourced by the install scripts: install_debian_packages PACKAGE... installs those of the
# Debian/Ubuntu packages that are not installed yet (as root, or with sudo), quietly; nothing
# when all are there, so a second run takes no time.
install_debian_packages() {
  local sudo="" missing=() package
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  for package in "$@"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}
