#!/bin/sh
# meson install script: install SRC as DEST (mode 0644) unless DEST exists, under $DESTDIR.
set -e
src=$1
dest=${DESTDIR:+$DESTDIR/}$2
dest=$(printf '%s' "$dest" | sed 's|//*|/|g')
if [ -e "$dest" ]; then
    echo "keeping existing $dest (the reference is $src)"
    exit 0
fi
mkdir -p "$(dirname "$dest")"
cp "$src" "$dest"
chmod 0644 "$dest"
echo "Installing $src to $dest"
