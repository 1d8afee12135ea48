#!/bin/sh
echo "hello from a cfs mount"
