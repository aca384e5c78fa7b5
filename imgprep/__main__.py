from imgprep.cli import main

main(prog_name="imgprep")
