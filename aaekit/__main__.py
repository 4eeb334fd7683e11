from aaekit.cli import main

main(prog_name="aaekit")
