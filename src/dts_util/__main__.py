from dts_util.cli import app

app(prog_name="dts-util")
