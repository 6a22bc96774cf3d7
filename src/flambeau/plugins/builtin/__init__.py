"""flambeau plugins/builtin."""
