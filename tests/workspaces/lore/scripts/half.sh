#!/bin/sh
# Writes the first half, signals that it started, and finishes only once `release` exists.
echo "first half" > "$FORGE_OUT/out.txt"
echo $$ > started
while [ ! -e release ]; do sleep 0.05; done
echo "second half" >> "$FORGE_OUT/out.txt"
