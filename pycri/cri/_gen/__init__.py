"""Generated from proto/api.proto by proto/regen.sh: do not edit, regenerate."""
