from apexctl.cli import main

main()
