from tbps.cli.main import app

app(prog_name="tbps")
