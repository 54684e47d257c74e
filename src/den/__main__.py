from den.cli.main import main

main()
