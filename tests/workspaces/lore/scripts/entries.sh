#!/bin/sh
# Prints every entry of the world's list files, sorted.
cat worlds/*.txt | sort
