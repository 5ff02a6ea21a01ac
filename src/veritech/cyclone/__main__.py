from veritech.cli.cyclone_cli import main

main()
