"""The command-line vocabulary of this project's commands: the parser every script uses (`parser`) and the flags
of the margin commands, read back into the settings objects (`margin_flags`)."""
