from fastlars.study.cli import main

main()
